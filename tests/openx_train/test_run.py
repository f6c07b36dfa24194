"""The run directory: RunInfo round trip, read_run errors, checkpoints saved and restored to the
bit, the last N plus the best by validation loss kept, params restored alone."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from openx_train import run, training
from openx_train.data import Camera, Structure
from openx_train.data.statistics import DatasetStatistics, KeyStatistics
from openx_train.models import input_spec, make_policy, model_config
from tests.openx_train.model_helpers import fake_batch


def _state(*, ema_decay=None, seed=0):
    config = model_config()
    config.head.kind = "mse"
    config.trunk.hidden_dims = (16, 16)
    batch = fake_batch(4)
    spec = input_spec(config, batch)
    policy = make_policy(config, spec)
    opt = training.optimizer_config()
    opt.warmup_steps, opt.ema_decay = 2, ema_decay
    mesh = training.make_mesh(jax.devices()[:1])
    state = training.put_state(training.create_train_state(
        policy, opt, rng=jax.random.PRNGKey(seed), total_steps=100), mesh)
    return spec, mesh, state, batch


def _train(state, spec, mesh, steps, seed=1):
    step = training.jit_train_step(mesh)
    for i in range(steps):
        state, _ = step(state, training.put_batch(fake_batch(4, seed=seed + i), spec, mesh))
    return state


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert len(la) == len(lb) and la
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def _info(spec):
    stats = DatasetStatistics({"action": KeyStatistics.from_summary(
        {"mean": [0.5, -1.0], "std": [2.0, 3.0], "min": [-1.0, -4.0], "max": [2.0, 5.0],
         "count": 10})}, num_episodes=2, num_steps=12)
    structure = Structure(state=("observation/state",),
                          images={"image_primary": Camera("observation/image", 32)},
                          normalization={"action": "bounds"})
    ds = run.DatasetInfo("reacher", "/data/reacher", structure, stats, frames=10, episodes=2)
    return run.RunInfo(kind="bc", datasets=(ds,), input_spec=spec,
                       model=dict(model_config().to_dict()), loader={"n_obs": 2, "n_action": 3},
                       domain_names=("reacher",))


def test_run_info_round_trip(tmp_path):
    spec, *_ = _state()
    info = _info(spec)
    config = model_config()
    run.write_run(tmp_path, info, {"model": config, "steps": 10})
    back = run.read_run(tmp_path)
    assert back.to_json() == info.to_json()
    assert back.input_spec == spec
    assert back.dataset("reacher").structure == info.datasets[0].structure
    np.testing.assert_array_equal(back.dataset().statistics["action"].std, [2.0, 3.0])
    assert run.read_config(tmp_path).steps == 10
    assert run.read_config(tmp_path).model.trunk.hidden_dims == [512, 512, 512]
    with pytest.raises(run.RunError, match=r"expected one of \['reacher'\], given 'other'"):
        back.dataset("other")


def test_read_run_errors_name_the_path_and_the_field(tmp_path):
    with pytest.raises(run.RunNotFoundError, match="no such directory"):
        run.read_run(tmp_path / "nope")
    with pytest.raises(run.RunNotFoundError, match=r"run\.json"):
        run.read_run(tmp_path)
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError
        run.read_run(tmp_path)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(run.RunError, match="not readable JSON"):
        run.read_run(tmp_path)
    spec, *_ = _state()
    data = _info(spec).to_json()
    data["format_version"] = 7
    (tmp_path / "run.json").write_text(json.dumps(data))
    with pytest.raises(run.RunError, match="format_version: expected 1, given 7"):
        run.read_run(tmp_path)
    data = _info(spec).to_json()
    del data["input_spec"]
    (tmp_path / "run.json").write_text(json.dumps(data))
    with pytest.raises(run.RunError, match="missing field 'input_spec'"):
        run.read_run(tmp_path)
    data = _info(spec).to_json()
    data["datasets"][0]["structure"]["bogus"] = 1
    (tmp_path / "run.json").write_text(json.dumps(data))
    with pytest.raises(run.RunError, match=r"datasets\[0\].*bogus"):
        run.read_run(tmp_path)
    with pytest.raises(run.RunError, match="kind"):
        run.RunInfo(kind="rl", datasets=_info(spec).datasets, input_spec=spec, model={})
    with pytest.raises(run.RunNotFoundError, match="checkpoints"):
        run.restore_params(tmp_path)


def test_checkpoint_round_trip_is_bitwise_and_training_continues_identically(tmp_path):
    spec, mesh, state, _ = _state(ema_decay=0.9)
    state = _train(state, spec, mesh, 3)
    ckpt = run.Checkpointer(tmp_path, keep=2)
    assert ckpt.latest_step() is None
    assert ckpt.save(state)
    ckpt.close()

    _, _, template, _ = _state(ema_decay=0.9, seed=5)  # other values, same structure
    ckpt = run.Checkpointer(tmp_path, keep=2)
    assert ckpt.latest_step() == 3
    restored = ckpt.restore(template)
    ckpt.close()
    assert int(restored.step) == 3
    saved = jax.device_get(run.state_tree(state))
    _assert_trees_equal(jax.device_get(run.state_tree(restored)), saved)
    # The restored state trains on to the same bits as the original (the step donates both).
    _assert_trees_equal(jax.device_get(_train(restored, spec, mesh, 2, seed=10).params),
                        jax.device_get(_train(state, spec, mesh, 2, seed=10).params))

    params, step = run.restore_params(tmp_path)
    assert step == 3
    _assert_trees_equal(params, saved["ema_params"])  # EMA when kept
    params, _ = run.restore_params(tmp_path, ema=False)
    _assert_trees_equal(params, saved["params"])


def test_restore_params_without_ema_and_mismatched_templates(tmp_path):
    spec, mesh, state, _ = _state()
    state = _train(state, spec, mesh, 1)
    with run.Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(state)
    params, step = run.restore_params(tmp_path, which=1)
    assert step == 1
    _assert_trees_equal(params, jax.device_get(state.params))
    with pytest.raises(run.RunError, match="no EMA parameters"):
        run.restore_params(tmp_path, ema=True)
    with pytest.raises(run.RunNotFoundError, match=r"no step 7; have \[1\]"):
        run.restore_params(tmp_path, which=7)
    with pytest.raises(run.RunNotFoundError, match="validation loss"):
        run.restore_params(tmp_path, which="best")
    with pytest.raises(run.RunError, match="which"):
        run.restore_params(tmp_path, which="first")
    _, _, with_ema, _ = _state(ema_decay=0.9)
    with run.Checkpointer(tmp_path) as ckpt, pytest.raises(run.RunError, match="EMA"):
        ckpt.restore(with_ema)


def test_keeps_the_last_n_and_the_best_by_validation_loss(tmp_path):
    spec, mesh, state, _ = _state()
    losses = {1: 0.5, 2: 0.2, 3: 0.4, 4: None, 5: 0.3, 6: None}
    saved = {}
    with run.Checkpointer(tmp_path, keep=2) as ckpt:
        for step, loss in losses.items():
            state = _train(state, spec, mesh, 1, seed=step)
            saved[step] = jax.device_get(state.params)
            ckpt.save(state, val_loss=loss)
            assert not ckpt.save(state)  # already saved: nothing written
        ckpt.wait()
        assert ckpt.steps() == [2, 5, 6]
        assert ckpt.best_step() == 2 and ckpt.latest_step() == 6
    # Reopened, the validation losses are read back from the checkpoints.
    with run.Checkpointer(tmp_path, keep=2) as ckpt:
        assert ckpt.best_step() == 2 and ckpt.val_loss(5) == pytest.approx(0.3)
        state = _train(state, spec, mesh, 1, seed=7)
        ckpt.save(state, val_loss=0.1)
        ckpt.wait()
        assert ckpt.steps() == [6, 7] and ckpt.best_step() == 7
    params, step = run.restore_params(tmp_path, "best")
    assert step == 7
    params, step = run.restore_params(tmp_path, 6)
    _assert_trees_equal(params, saved[6])
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["6", "7"]


def test_structure_json_round_trip():
    s = Structure(state=("a", "b"), images={"wrist": Camera(None, (8, 16))}, action=("act",),
                  language=None, normalization={"b": "none"}, action_normalization="bounds")
    assert Structure.from_json(json.loads(json.dumps(s.to_json()))) == s
    with pytest.raises(ValueError, match="unknown fields"):
        Structure.from_json({"stat": ["a"]})


def test_quiet_library_logs_drops_only_library_info(caplog):
    import logging

    from openx_train.run import quiet_library_logs

    logger = logging.getLogger("quiet_test")
    quiet_library_logs("quiet_test")
    quiet_library_logs("quiet_test")  # installed once
    assert len(logger.filters) == 1

    def record(level, pathname):
        return logging.LogRecord("absl", level, pathname, 1, "message", None, None)

    keep = logger.filters[0].filter
    assert not keep(record(logging.INFO, "/site-packages/orbax/checkpoint/checkpointer.py"))
    assert keep(record(logging.WARNING, "/site-packages/orbax/checkpoint/manager.py"))
    read_only = record(logging.WARNING, "/site-packages/orbax/checkpoint/manager.py")
    read_only.msg = "Given directory is read only=%s"
    assert not keep(read_only)
    assert logging.getLogger("jax._src.xla_bridge").getEffectiveLevel() == logging.WARNING
    assert keep(record(logging.WARNING, "/site-packages/orbax/checkpoint/checkpointer.py"))
    assert keep(record(logging.INFO, "/work/openx_train/data/loader.py"))
