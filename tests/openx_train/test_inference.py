"""The env policy feeds the model what the loader fed it in training (no train/eval skew).

Real episodes are logged from real envs (Reacher-v5: a float64 state the logger stores as
float32; SyntheticCamera-v0: PNG cameras resized for the batch, state, language), while a
wrapper under the logger records the raw observations the env returned. The loader's batch of
the episode's frames and the policy's preprocessing of those raw observations (windows built
step by step as in a rollout) must give the same model inputs, element by element.
"""

from __future__ import annotations

import os

import gymnasium as gym
import jax
import numpy as np
import pytest

from openx_train import models
from openx_train.data import (
    Camera,
    DatasetConfig,
    LoaderConfig,
    Structure,
    make_dataloader,
)
from openx_train.eval import ObservationHistory
from openx_train.eval.wrappers import with_pad_mask
from openx_train.inference import ActionDecoder, PolicyInputError, make_env_policy
from openx_train.models.spec import flatten
from oxe_envlogger import AutoOXEEnvLogger
from oxe_envlogger.envs import ENV_ID, run_episodes


class Recorder(gym.Wrapper):
    """Keeps every raw observation (and reset info, and action) the env gives and takes."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.observations, self.actions, self.infos = [], [], []

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.observations.append(obs)
        self.infos.append(info)
        return obs, info

    def step(self, action):
        self.actions.append(np.array(action))
        out = self.env.step(action)
        self.observations.append(out[0])
        return out


def log_one_episode(env: gym.Env, directory: str, name: str) -> Recorder:
    recorder = Recorder(env)
    logger = AutoOXEEnvLogger(recorder, name, directory)
    with logger:
        run_episodes(logger, 1, seed=3)
    return recorder


def one_batch(path: str, structure: Structure, **options):
    loader = make_dataloader(DatasetConfig(path, structure),
                             LoaderConfig(augment=None, deterministic=True, **options))
    return loader, next(iter(loader))


def rollout_inputs(policy, observations, *, goal_steps=None, **task):
    """The policy's model inputs at every step of an episode, windows built as a rollout does."""
    history = ObservationHistory(policy.n_obs)
    out = []
    for t, obs in enumerate(observations):
        single = jax.tree_util.tree_map(lambda x: np.asarray(x)[None], obs)
        window, mask = history(single, np.array([t == 0]))
        extra = dict(task)
        if goal_steps is not None:
            extra["goal"] = jax.tree_util.tree_map(lambda x: np.asarray(x)[None],
                                                   observations[goal_steps.get(t, t)])
        out.append(policy.model_inputs(with_pad_mask(window, mask), **extra))
    return out


def assert_same_inputs(loader_inputs, rollout, step_index):
    loader_flat = flatten(loader_inputs)
    for row, t in enumerate(step_index):
        got = flatten(rollout[t])
        assert sorted(got) == sorted(loader_flat)
        for path, value in loader_flat.items():
            assert got[path].dtype == value.dtype, path
            np.testing.assert_array_equal(got[path][0], value[row], err_msg=f"{path} step {t}")


@pytest.fixture(scope="module")
def reacher(tmp_path_factory):
    directory = os.fspath(tmp_path_factory.mktemp("inference") / "reacher")
    env = gym.make("Reacher-v5", max_episode_steps=12)
    return directory, log_one_episode(env, directory, "reacher")


@pytest.fixture(scope="module")
def camera(tmp_path_factory):
    directory = os.fspath(tmp_path_factory.mktemp("inference") / "camera")
    env = gym.make(ENV_ID, image_size=32, wrist_size=16, max_episode_steps=9)
    return directory, log_one_episode(env, directory, "camera")


def test_no_skew_state(reacher):
    path, rec = reacher
    frames = len(rec.actions)
    structure = Structure(state=("observation",), action=("action",),
                          action_normalization="bounds")
    loader, batch = one_batch(path, structure, batch_size=frames, n_obs=3, n_action=2)
    assert sorted(batch["step_index"].tolist()) == list(range(frames))  # every frame once
    config = models.model_config()
    spec = models.input_spec(config, batch)
    module = models.make_policy(config, spec)
    params = models.init_params(module, jax.random.PRNGKey(0))
    policy = make_env_policy(module, params, structure=structure,
                             statistics=loader.statistics["reacher"], dataset="reacher")
    # The logger stored the float64 observations as float32: the rollout sees float64.
    assert np.asarray(rec.observations[0]).dtype == np.float64
    rollout = rollout_inputs(policy, rec.observations)
    assert_same_inputs(models.model_inputs(batch, spec, train=False), rollout,
                       batch["step_index"])
    # The pad mask is the loader's: False before the episode start.
    np.testing.assert_array_equal(rollout[0]["observation"]["pad_mask"], [[False, False, True]])
    np.testing.assert_array_equal(rollout[5]["observation"]["pad_mask"], [[True, True, True]])

    # Actions: the loader's normalized chunks decode to the actions the env was given.
    decoded = policy.decode(batch["action"])
    for row, t in enumerate(batch["step_index"]):
        for k in range(2):
            if batch["action_pad_mask"][row, k]:
                np.testing.assert_allclose(decoded[row, k], rec.actions[t + k], rtol=1e-5,
                                           atol=1e-6)
    # The decoder is ops.unnormalize, to the bit.
    from openx_train.data import ops

    stats = loader.statistics["reacher"]
    np.testing.assert_array_equal(decoded, np.asarray(ops.unnormalize(
        batch["action"], stats["action"], structure.normalization_of("action"))))
    # And the whole call: raw windows in, unnormalized chunks out.
    history = ObservationHistory(3)
    window = with_pad_mask(*history(np.stack(rec.observations[:4]), np.ones(4, bool)))
    chunks = policy(window)
    assert chunks.shape == (4, 2, 2) and np.isfinite(chunks).all()
    np.testing.assert_array_equal(
        chunks, policy.decode(policy.predict(policy.model_inputs(window))))
    # One action per call from raw observations (a robot loop): the chunk's actions in turn,
    # then a new chunk from the window of the last 3 observations.
    step = policy.stepwise()
    step.reset(np.arange(1))
    history = ObservationHistory(3)
    got, want = [], []
    for t in range(4):
        obs = rec.observations[t][None]
        window = with_pad_mask(*history(obs, np.array([t == 0])))
        if t % 2 == 0:
            chunk = policy(window)[0]
        want.append(chunk[t % 2])
        got.append(step(obs))
    assert got[0].shape == (1, 2)
    np.testing.assert_allclose(np.concatenate(got), np.stack(want), rtol=1e-6)


def test_no_skew_cameras_language_goal(camera):
    path, rec = camera
    frames = len(rec.actions)
    structure = Structure(state=("observation/state",),
                          images={"image": Camera("observation/image", (24, 20)),
                                  "wrist": Camera("observation/wrist_image", 16),
                                  "absent": Camera(None, 8)},
                          language="language_instruction")
    loader, batch = one_batch(path, structure, batch_size=frames, n_obs=2, n_action=3,
                              goal_relabeling=True)
    assert sorted(batch["step_index"].tolist()) == list(range(frames))
    config = models.model_config()
    config.image_encoder.kind = "conv"
    config.image_encoder.width = 4
    config.task.goal = True
    config.task.language = "tokens"
    spec = models.input_spec(config, batch)
    assert spec.is_image("observation/image") and spec.language == "tokens"
    module = models.make_policy(config, spec)
    params = models.init_params(module, jax.random.PRNGKey(0))
    policy = make_env_policy(module, params, structure=structure,
                             statistics=loader.statistics["camera"], dataset="camera")
    goal_steps = {int(t): int(g) for t, g in zip(batch["step_index"], batch["goal_step_index"])}
    instruction = rec.infos[0]["language_instruction"]
    rollout = rollout_inputs(policy, rec.observations, goal_steps=goal_steps,
                             instruction=[instruction])
    inputs = models.model_inputs(batch, spec, train=False)
    assert inputs["observation"]["image"].shape[2:] == (24, 20, 3)
    assert inputs["language_tokens"].any()
    assert_same_inputs(inputs, rollout, batch["step_index"])
    # The resize is not a pass-through: the batch images differ from a crude subsample.
    assert not np.array_equal(inputs["observation"]["image"][0, -1],
                              rec.observations[0]["image"][:24, :20])
    window = rollout[0]
    chunk = policy.decode(policy.predict(window))
    assert chunk.shape == (1, 3, 7)


def test_float_images_and_errors(camera):
    path, rec = camera
    structure = Structure(state=("observation/state",),
                          images={"image": Camera("observation/image", 16)}, language=None)
    loader, batch = one_batch(path, structure, batch_size=len(rec.actions),
                              image_dtype="float32")
    config = models.model_config()
    config.image_encoder.kind = "conv"
    config.image_encoder.width = 4
    spec = models.input_spec(config, batch)
    assert spec.get("observation/image").dtype == "float32"
    module = models.make_policy(config, spec)
    params = models.init_params(module, jax.random.PRNGKey(0))
    policy = make_env_policy(module, params, structure=structure,
                             statistics=loader.statistics["camera"])
    rollout = rollout_inputs(policy, rec.observations)
    assert_same_inputs(models.model_inputs(batch, spec, train=False), rollout,
                       batch["step_index"])
    # n_obs == 1: plain batched observations work without a window.
    obs = jax.tree_util.tree_map(lambda x: np.asarray(x)[None], rec.observations[0])
    assert policy(obs).shape == (1, 1, 7)
    with pytest.raises(PolicyInputError, match="observation/image"):
        bad = {**obs, "image": obs["image"][..., :2]}  # not an image any more
        make_env_policy(module, params, structure=structure,
                        statistics=loader.statistics["camera"])(bad)
    with pytest.raises(PolicyInputError, match="observation/state"):
        make_env_policy(module, params, structure=structure,
                        statistics=loader.statistics["camera"])(
            {k: v for k, v in obs.items() if k != "state"})


def test_action_decoder_several_keys():
    from openx_train.data.statistics import DatasetStatistics, KeyStatistics

    def stats(mean, std):
        mean, std = np.asarray(mean, float), np.asarray(std, float)
        return KeyStatistics.from_summary({"count": 1, "mean": mean, "std": std, "min": mean,
                                           "max": mean})

    statistics = DatasetStatistics({"action/arm": stats([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]),
                                    "action/gripper": stats([0.5], [0.25])})
    structure = Structure(action=("action/arm", "action/gripper"),
                          normalization={"action/gripper": "none"})
    decode = ActionDecoder(structure, statistics, 4)
    out = decode(np.array([[[1.0, 0.0, -1.0, 0.7]]]))
    np.testing.assert_allclose(out["arm"], [[[3.0, 2.0, 1.0]]])
    np.testing.assert_allclose(out["gripper"], [[[0.7]]], rtol=1e-6)
    with pytest.raises(PolicyInputError, match="predicts 5"):
        ActionDecoder(structure, statistics, 5)


def _write_run(directory, path, spec, module, datasets, config):
    from openx_train import run, training

    state = training.create_train_state(module, training.optimizer_config(),
                                        rng=jax.random.PRNGKey(1), total_steps=10_000)
    with run.Checkpointer(directory, async_save=False) as ckpt:
        ckpt.save(state)
    infos = tuple(run.DatasetInfo(name, path, structure, stats)
                  for name, structure, stats in datasets)
    run.write_run(directory, run.RunInfo(kind="bc", datasets=infos, input_spec=spec,
                                         model=config.to_dict()))
    return state


def test_load_policy(reacher, tmp_path):
    run = pytest.importorskip("openx_train.run")
    from openx_train.inference import load_policy

    path, rec = reacher
    structure = Structure(state=("observation",), action=("action",))
    loader, batch = one_batch(path, structure, batch_size=4, n_obs=2)
    config = models.model_config()
    config.trunk.hidden_dims = (32, 32)
    spec = models.input_spec(config, batch)
    module = models.make_policy(config, spec)
    stats = loader.statistics["reacher"]
    state = _write_run(tmp_path / "run", path, spec, module,
                       [("reacher", structure, stats)], config)
    policy = load_policy(tmp_path / "run")
    assert policy.step == 0 and policy.dataset == "reacher" and policy.n_obs == 2
    direct = make_env_policy(module, state.params, structure=structure, statistics=stats)
    window = with_pad_mask(*ObservationHistory(2)(np.stack(rec.observations[:3]),
                                                  np.ones(3, bool)))
    np.testing.assert_array_equal(policy(window), direct(window))
    assert policy(window).shape == (3, 1, 2)

    # A mixture normalized per dataset: the named dataset's statistics unnormalize.
    from openx_train.data.statistics import DatasetStatistics, KeyStatistics

    shifted = KeyStatistics.from_summary({**stats["action"].to_json(),
                                          "mean": (stats["action"].mean + 10.0).tolist()})
    other = DatasetStatistics({**stats.keys, "action": shifted})
    _write_run(tmp_path / "mix", path, spec, module,
               [("reacher", structure, stats), ("other", structure, other)], config)
    with pytest.raises(PolicyInputError, match=r"dataset= one of \['reacher', 'other'\]"):
        load_policy(tmp_path / "mix")
    with pytest.raises(PolicyInputError, match=r"trained on \['reacher', 'other'\]; given 'x'"):
        load_policy(tmp_path / "mix", dataset="x")
    a = load_policy(tmp_path / "mix", dataset="reacher")(window)
    b = load_policy(tmp_path / "mix", dataset="other")(window)
    np.testing.assert_allclose(b, a + 10.0, rtol=1e-5)
    with pytest.raises(run.RunNotFoundError, match="nothing_here"):
        load_policy(tmp_path / "nothing_here")
    with pytest.raises(run.RunNotFoundError, match="no step 7"):
        load_policy(tmp_path / "run", which=7)


def test_evaluate_run_with_language(camera, tmp_path):
    pytest.importorskip("openx_train.run")
    from openx_train.inference import evaluate_run
    from tests.helpers import read_tfds

    path, _ = camera
    structure = Structure(state=("observation/state",),
                          images={"image": Camera("observation/image", 16)})
    loader, batch = one_batch(path, structure, batch_size=4, n_obs=2, n_action=2)
    config = models.model_config()
    config.image_encoder.kind = "conv"
    config.image_encoder.width = 4
    config.trunk.hidden_dims = (16,)
    config.task.language = "tokens"
    spec = models.input_spec(config, batch)
    _write_run(tmp_path / "run", path, spec, models.make_policy(config, spec),
               [("camera", structure, loader.statistics["camera"])], config)
    # The env renders 256x256 frames (the run logged 32x32): resized to the camera's 16x16.
    results = evaluate_run(tmp_path / "run", ENV_ID, num_episodes=3, num_envs=2,
                           vectorization="sync", max_episode_steps=4, temporal_ensemble=0.0,
                           log_dir=os.fspath(tmp_path / "log"))
    assert results["num_episodes"] == 3 and results["success_rate"] == 0.0
    episodes = read_tfds(os.fspath(tmp_path / "log"))
    assert len(episodes) == 3
    assert all(e["steps"]["language_instruction"][0].startswith(b"put the") for e in episodes)


def test_training_evaluates_every_eval_freq(reacher, tmp_path):
    """train()'s eval_freq rolls out the checkpoint just saved through evaluate_run."""
    loop = pytest.importorskip("openx_train.training.loop")
    import csv

    path, _ = reacher
    config = loop.train_config()
    config.data.datasets = [{"path": path}]
    config.data.structure = {"state": ["observation"], "action": ["action"]}
    config.data.val_fraction = 0.0
    config.data.loader.augment = False
    config.model.trunk.hidden_dims = (16,)
    config.optimizer.warmup_steps = 1
    config.steps, config.batch_size, config.steps_per_call = 4, 8, 1
    config.log_freq, config.val_freq, config.save_freq = 2, 0, 0
    config.eval_freq = 2
    config.eval.env_name = "Reacher-v5"
    config.eval.num_episodes, config.eval.num_envs, config.eval.max_episode_steps = 2, 1, 5
    config.compilation_cache = "none"
    out = loop.train(config, os.fspath(tmp_path / "run"))
    assert np.isfinite(out["eval/return_mean"]) and out["eval/length_mean"] == 5.0
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("eval/return_mean")]
    assert [int(r["step"]) for r in rows] == [2, 4]
