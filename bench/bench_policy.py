"""Policy latency per call (W5 of WORKLOADS.md): ``policy(observation)`` of
``openx_train.inference`` (raw env observation in, the loader's preprocessing, the jitted model,
unnormalized action chunk out) for one env, against the bare jitted model call on inputs already
prepared, measured alternately in the same process. Prints one JSON line.

* ``state``: a Reacher-v5 observation (10 float64), MLP 512x512x512, MSE head, history 1,
  chunk 1 (the reacher_state config's shapes).
* ``image``: a SyntheticCamera-like observation (two 128x128 uint8 cameras, state 8), ResNet-18
  (one encoder per camera, spatial softmax), history 2, chunk 4, MSE head.
* ``diffusion``: the state policy with the DDPM head (its default steps), chunk 4: sampling
  latency.

Per config: p50 and p99 of the full call and of the bare model call (ms), their ratio, and the
preprocessing alone (p50); each the median over ``--reps`` repetitions of ``--calls`` calls;
and ``<config>_tensorflow_loaded``: whether TensorFlow was loaded by then (configs run in the
order given: the state policy alone never loads it).
A robot loop at 10-50 Hz has 20-100 ms per step. Usage::

    python bench/bench_policy.py [--reps 3] [--calls 200] [--image_calls 30] [--only state,image]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _stats(keys_shapes):
    import numpy as np

    from openx_train.data.statistics import DatasetStatistics, KeyStatistics

    rs = np.random.default_rng(0)
    keys = {}
    for key, shape in keys_shapes.items():
        mean = rs.normal(size=shape)
        keys[key] = KeyStatistics.from_summary({"count": 100, "mean": mean,
                                                "std": rs.uniform(0.5, 2.0, shape),
                                                "min": mean - 3, "max": mean + 3})
    return DatasetStatistics(keys)


def _build(kind: str):
    """(policy, observation window for one env)."""
    import jax
    import numpy as np

    from openx_train import models
    from openx_train.data import Camera, Structure
    from openx_train.eval import ObservationHistory
    from openx_train.eval.wrappers import with_pad_mask
    from openx_train.inference import make_env_policy

    rs = np.random.default_rng(1)
    config = models.model_config()
    config.trunk.hidden_dims = (512, 512, 512)
    config.head.kind = "mse"
    if kind in ("state", "diffusion"):
        n_obs, n_action = 1, (1 if kind == "state" else 4)
        obs = rs.normal(size=10)  # float64, as Reacher-v5 gives it
        structure = Structure(state=("observation",), action=("action",))
        stats = _stats({"observation": (10,), "action": (2,)})
        batch_obs = {"state": np.zeros((1, n_obs, 10), np.float32)}
        action_dim = 2
        if kind == "diffusion":
            config.head.kind = "diffusion"
    else:
        n_obs, n_action = 2, 4
        obs = {"image": rs.integers(0, 256, (128, 128, 3), dtype=np.uint8),
               "wrist_image": rs.integers(0, 256, (128, 128, 3), dtype=np.uint8),
               "state": rs.normal(size=8).astype(np.float32)}
        structure = Structure(state=("observation/state",), action=("action",),
                              images={"image_primary": Camera("observation/image", 128),
                                      "image_wrist": Camera("observation/wrist_image", 128)})
        stats = _stats({"observation/state": (8,), "action": (7,)})
        batch_obs = {"state": np.zeros((1, n_obs, 8), np.float32),
                     "image_primary": np.zeros((1, n_obs, 128, 128, 3), np.uint8),
                     "image_wrist": np.zeros((1, n_obs, 128, 128, 3), np.uint8)}
        action_dim = 7
        config.image_encoder.kind = "resnet18"
        config.image_encoder.shared = False
    mask = np.ones((1, n_obs), bool)
    batch_obs.update(pad_mask=mask, pad_mask_dict={k: mask for k in batch_obs})
    batch = {"observation": batch_obs,
             "action": np.zeros((1, n_action, action_dim), np.float32),
             "action_pad_mask": np.ones((1, n_action), bool)}
    spec = models.input_spec(config, batch)
    module = models.make_policy(config, spec)
    params = models.init_params(module, jax.random.PRNGKey(0))
    policy = make_env_policy(module, params, structure=structure, statistics=stats)
    single = jax.tree_util.tree_map(lambda x: np.asarray(x)[None], obs)
    window = with_pad_mask(*ObservationHistory(n_obs)(single, np.ones(1, bool)))
    return policy, window


def _percentiles(times):
    import numpy as np

    ms = np.asarray(times) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def _measure(kind: str, *, reps: int, calls: int) -> dict:
    import jax
    import numpy as np

    t0 = time.perf_counter()
    policy, window = _build(kind)
    policy(window)  # compile
    first_call_s = time.perf_counter() - t0
    inputs = jax.device_put(policy.model_inputs(window))
    rng = jax.random.PRNGKey(0)

    def bare():
        return policy.jitted_model(policy.params, inputs, rng, np.uint32(0)).block_until_ready()

    bare()
    out = {k: [] for k in ("full_p50", "full_p99", "bare_p50", "bare_p99", "pre_p50")}
    for _ in range(reps):
        full_t, bare_t, pre_t = [], [], []
        for _ in range(calls):  # alternately, so that the host's noise hits both alike
            s = time.perf_counter()
            action = policy(window)
            full_t.append(time.perf_counter() - s)
            s = time.perf_counter()
            bare()
            bare_t.append(time.perf_counter() - s)
            s = time.perf_counter()
            policy.model_inputs(window)
            pre_t.append(time.perf_counter() - s)
        assert np.isfinite(np.asarray(action)).all()
        for name, t in (("full", full_t), ("bare", bare_t)):
            p50, p99 = _percentiles(t)
            out[f"{name}_p50"].append(p50)
            out[f"{name}_p99"].append(p99)
        out["pre_p50"].append(_percentiles(pre_t)[0])
    med = {k: statistics.median(v) for k, v in out.items()}
    return {f"{kind}_call_p50_ms": round(med["full_p50"], 3),
            f"{kind}_call_p99_ms": round(med["full_p99"], 3),
            f"{kind}_model_p50_ms": round(med["bare_p50"], 3),
            f"{kind}_model_p99_ms": round(med["bare_p99"], 3),
            f"{kind}_preprocess_p50_ms": round(med["pre_p50"], 3),
            f"{kind}_call_over_model_p50": round(med["full_p50"] / med["bare_p50"], 3),
            f"{kind}_build_and_first_call_s": round(first_call_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--image_calls", type=int, default=30)
    parser.add_argument("--only", default="state,image,diffusion")
    args = parser.parse_args()
    import jax

    result = {"bench": "policy", "backend": jax.default_backend(), "reps": args.reps}
    for kind in args.only.split(","):
        calls = args.image_calls if kind == "image" else args.calls
        result.update(_measure(kind, reps=args.reps, calls=calls))
        # Whether TensorFlow was loaded by then (the state policy never loads it).
        result[f"{kind}_tensorflow_loaded"] = "tensorflow" in sys.modules
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
