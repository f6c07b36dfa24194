"""evaluate(): exactly num_episodes seeded episodes in every autoreset mode, sync and async;
the policy's reset hook and task inputs at episode starts; success, the t-interval, the video;
rollouts logged as RLDS and read back with tfds."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

from openx_train.eval import TaskInput, evaluate
from openx_train.eval.rollout import wilson_interval
from tests.helpers import read_tfds
from tests.openx_train.eval.fake_envs import (
    SeededEnv,
    episode_length,
    episode_return,
    frame_level,
)

MODES = list(AutoresetMode)
NUM_EPISODES, SEED = 7, 10


def env_fn(made: list | None = None, **kwargs):
    """Makes SeededEnvs; keeps them in ``made`` (sync vectorization) for inspection."""
    def make():
        env = SeededEnv(**kwargs)
        if made is not None:
            made.append(env)
        return env
    return make


def echo_policy(obs, **task):
    """Action = the observation ([seed, t]): the logged actions say where they were taken."""
    return np.asarray(obs, np.float32)


def expected_episodes(seed: int = SEED, n: int = NUM_EPISODES) -> list[dict]:
    return [{"index": k, "seed": seed + k, "return": episode_return(seed + k),
             "length": episode_length(seed + k), "success": (seed + k) % 3 == 0,
             "terminated": (seed + k) % 2 == 0, "truncated": (seed + k) % 2 == 1}
            for k in range(n)]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("num_envs", [1, 2, 3])
def test_exactly_num_episodes_in_every_autoreset_mode(mode, num_envs):
    made: list[SeededEnv] = []
    res = evaluate(echo_policy, env_fn(made), num_episodes=NUM_EPISODES, num_envs=num_envs,
                   seed=SEED, vectorization="sync", autoreset_mode=mode)
    assert res["episodes"] == expected_episodes()  # exact returns: no step lost or borrowed
    assert res["num_episodes"] == NUM_EPISODES and res["autoreset_mode"] == mode.value
    # Exactly the seven episodes were run, each once and to its end, none beyond them.
    run = sorted((e["seed"], len(e["actions"])) for env in made for e in env.episodes)
    assert run == [(SEED + k, episode_length(SEED + k)) for k in range(NUM_EPISODES)]
    # Every action was taken from the observation of its own episode and step.
    for env in made:
        for e in env.episodes:
            np.testing.assert_array_equal(
                e["actions"], [[e["seed"], t] for t in range(episode_length(e["seed"]))])
    assert res["env_steps"] == sum(episode_length(SEED + k) for k in range(NUM_EPISODES))
    assert res["length_mean"] == pytest.approx(res["env_steps"] / NUM_EPISODES)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_async_sub_envs_give_the_same_episodes(mode):
    res = evaluate(echo_policy, env_fn(), num_episodes=NUM_EPISODES, num_envs=3, seed=SEED,
                   autoreset_mode=mode)
    assert res["vectorization"] == "async"
    assert res["episodes"] == expected_episodes()


def test_more_sub_envs_than_episodes():
    res = evaluate(echo_policy, env_fn(), num_episodes=2, num_envs=5, seed=SEED,
                   vectorization="sync")
    assert res["num_envs"] == 2 and res["episodes"] == expected_episodes(n=2)


def test_summary_figures():
    res = evaluate(echo_policy, env_fn(), num_episodes=NUM_EPISODES, num_envs=2, seed=SEED,
                   vectorization="sync")
    returns = np.array([episode_return(SEED + k) for k in range(NUM_EPISODES)])
    assert res["return_mean"] == pytest.approx(returns.mean())
    t_975_df6 = 2.4469118511449692  # Student's t, 97.5% quantile, 6 degrees of freedom
    assert res["return_ci95"] == pytest.approx(
        t_975_df6 * returns.std(ddof=1) / np.sqrt(NUM_EPISODES))
    successes = [(SEED + k) % 3 == 0 for k in range(NUM_EPISODES)]
    assert res["success_rate"] == pytest.approx(np.mean(successes))
    assert res["success_ci95"] == pytest.approx(list(wilson_interval(sum(successes),
                                                                     NUM_EPISODES)))
    json.dumps(res, allow_nan=False)  # one JSON object, strictly
    for key in ("return_mean", "return_ci95", "success_rate", "length_mean", "num_episodes"):
        assert key in res
    one = evaluate(echo_policy, env_fn(), num_episodes=1, num_envs=1, vectorization="sync")
    assert one["return_ci95"] is None and one["return_std"] is None


def test_success_at_the_final_step_and_none_without_success():
    # SeededEnv reports success True at the first step of seeds divisible by 3, then False.
    res = evaluate(echo_policy, env_fn(), num_episodes=NUM_EPISODES, num_envs=2, seed=SEED,
                   vectorization="sync", success_at="final")
    assert [e["success"] for e in res["episodes"]] == [
        (SEED + k) % 3 == 0 and episode_length(SEED + k) == 1 for k in range(NUM_EPISODES)]
    res = evaluate(echo_policy, env_fn(success=False), num_episodes=3, num_envs=2,
                   vectorization="sync")
    assert res["success_rate"] is None and res["success_ci95"] is None
    assert [e["success"] for e in res["episodes"]] == [None] * 3


def test_wilson_interval():
    # Reference values (Wilson 1927 score interval, z = 1.96): 25/50 -> [0.3664, 0.6336].
    assert wilson_interval(25, 50) == pytest.approx((0.3664, 0.6336), abs=1e-4)
    lo, hi = wilson_interval(0, 50)
    assert lo == 0.0 and hi == pytest.approx(0.0714, abs=1e-4)  # not the normal's [0, 0]
    assert wilson_interval(50, 50) == pytest.approx((1 - 0.0714, 1.0), abs=1e-4)


class CheckingPolicy:
    """Checks, at every call, that reset() named exactly the sub-envs whose observation starts
    an episode (t == 0, the expected seed), and that the task inputs belong to the episode of
    the observation beside them (``instruction`` formatted from its seed)."""

    def __init__(self, num_envs: int, *, instruction: str | None = None, goal: bool = False):
        self.num_envs, self.instruction, self.goal = num_envs, instruction, goal
        self.fresh = np.zeros(num_envs, bool)
        self.episodes = np.full(num_envs, -1)  # each sub-env's episode count
        self.last: np.ndarray | None = None
        self.starts = 0

    def reset(self, env_indices):
        assert env_indices.dtype == np.int64
        self.fresh[env_indices] = True

    def __call__(self, obs, **task):
        assert set(task) == ({"instruction"} if self.instruction else set()) | (
            {"goal"} if self.goal else set())
        for i in range(self.num_envs):
            seed, t = obs[i]
            if self.fresh[i]:
                self.episodes[i] += 1
                k = i + self.episodes[i] * self.num_envs
                if k < NUM_EPISODES:  # else: the sub-env idles with its last observation
                    assert (seed, t) == (SEED + k, 0), (i, k, obs[i])
                    self.starts += 1
            else:
                # The same episode: one step on, or held (the NEXT_STEP reset step, idling).
                assert obs[i, 0] == self.last[i, 0], (i, obs[i], self.last[i])
                assert obs[i, 1] in (self.last[i, 1], self.last[i, 1] + 1)
            if self.instruction:
                assert task["instruction"][i] == self.instruction.format(int(seed))
            if self.goal:
                np.testing.assert_array_equal(task["goal"][i], [seed, -1])
        self.fresh[:] = False
        self.last = np.array(obs)
        return np.asarray(obs, np.float32)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("vectorization", ["sync", "async"])
def test_reset_hook_and_task_inputs_follow_the_episode_starts(mode, vectorization):
    policy = CheckingPolicy(3, instruction="task {}", goal=True)
    res = evaluate(policy, env_fn(), num_episodes=NUM_EPISODES, num_envs=3, seed=SEED,
                   vectorization=vectorization, autoreset_mode=mode,
                   instruction=TaskInput(info_key="language_instruction"),
                   goal=TaskInput(info_key="goal"))
    assert res["episodes"] == expected_episodes()
    assert policy.starts == NUM_EPISODES


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_instruction_from_a_method_or_a_constant(mode):
    policy = CheckingPolicy(2, instruction="method {}")
    evaluate(policy, env_fn(), num_episodes=NUM_EPISODES, num_envs=2, seed=SEED,
             vectorization="sync", autoreset_mode=mode, instruction=TaskInput(method="instruction"))
    assert policy.starts == NUM_EPISODES
    policy = CheckingPolicy(2, instruction="stack the blocks")
    evaluate(policy, env_fn(), num_episodes=3, num_envs=2, seed=SEED, vectorization="sync",
             autoreset_mode=mode, instruction=TaskInput(value="stack the blocks"))


def test_task_input_errors():
    with pytest.raises(ValueError, match="exactly one of info_key, method, value"):
        TaskInput()
    with pytest.raises(ValueError, match="exactly one"):
        TaskInput(info_key="a", value=1)
    with pytest.raises(KeyError, match=r"instruction: the reset info of sub-env 0 has no key "
                                       r"'prompt' \(keys: \['goal', 'language_instruction'\]\)"):
        evaluate(echo_policy, env_fn(), num_episodes=2, num_envs=1, vectorization="sync",
                 instruction=TaskInput(info_key="prompt"))


@pytest.mark.parametrize("ext", ["gif", "mp4"])
def test_video_of_the_first_episodes(tmp_path, ext):
    import imageio.v3 as iio

    path = tmp_path / f"eval.{ext}"
    res = evaluate(echo_policy, env_fn(render_mode="rgb_array"), num_episodes=5, num_envs=2,
                   seed=SEED, video_path=path, video_episodes=3)
    assert res["video_path"] == str(path)
    frames = iio.imread(path, index=None)
    # A frame after each reset and after each step, episodes 0, 1, 2 one after the other.
    levels = [frame_level(SEED + k, t) for k in range(3) for t in range(episode_length(SEED + k) + 1)]
    assert frames.shape[0] == len(levels)
    if ext == "gif":  # lossless for a few gray levels: the frames are those episodes' frames
        np.testing.assert_array_equal(frames[:, 8, 8, 0], levels)
    else:
        np.testing.assert_allclose(frames[:, 8, 8, 0], levels, atol=4)


@pytest.mark.filterwarnings("ignore:.*render method without specifying any render mode")
def test_video_needs_rgb_array_rendering(tmp_path):
    with pytest.raises(RuntimeError, match="render_mode='rgb_array'"):
        evaluate(echo_policy, lambda: gym.make("CartPole-v1"), num_episodes=1, num_envs=1,
                 vectorization="sync", video_path=tmp_path / "v.mp4")


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("vectorization", ["sync", "async"])
def test_logged_rollouts_read_back_with_tfds(tmp_path, mode, vectorization):
    log_dir = tmp_path / "eval_log"
    res = evaluate(echo_policy, env_fn(), num_episodes=NUM_EPISODES, num_envs=3, seed=SEED,
                   vectorization=vectorization, autoreset_mode=mode, log_dir=log_dir,
                   log_name="seeded", instruction=TaskInput(info_key="language_instruction"),
                   log_options={"float64": "exact"})  # float64 rewards compared exactly below
    assert res["log_dir"] == str(log_dir)
    logged = read_tfds(str(log_dir))
    # One RLDS episode per reported episode: none from an idle sub-env, none twice.
    assert len(logged) == NUM_EPISODES
    by_seed = {int(ep["steps"]["observation"][0, 0]): ep for ep in logged}
    assert sorted(by_seed) == [SEED + k for k in range(NUM_EPISODES)]
    for e in res["episodes"]:
        steps = by_seed[e["seed"]]["steps"]
        n = e["length"]
        assert sum(steps["reward"].tolist()) == e["return"]  # float64, added in step order
        np.testing.assert_array_equal(steps["observation"], [[e["seed"], t] for t in range(n + 1)])
        # Each action beside the observation it was taken from; the final step's is zero.
        np.testing.assert_array_equal(steps["action"][:-1], steps["observation"][:-1])
        assert steps["is_first"].tolist() == [True] + [False] * n
        assert steps["is_last"].tolist() == [False] * n + [True]
        assert bool(steps["is_terminal"][-1]) == e["terminated"]
        assert set(steps["language_instruction"].tolist()) == {f"task {e['seed']}".encode()}
        assert not by_seed[e["seed"]]["invalid"]


def test_logging_appends_to_a_dataset_with_the_same_features(tmp_path):
    log_dir = tmp_path / "eval_log"
    for seed in (0, 100):
        evaluate(echo_policy, env_fn(), num_episodes=3, num_envs=2, seed=seed,
                 vectorization="sync", log_dir=log_dir, log_name="seeded")
    seeds = sorted(int(ep["steps"]["observation"][0, 0]) for ep in read_tfds(str(log_dir)))
    assert seeds == [0, 1, 2, 100, 101, 102]


def test_bad_policy_outputs_name_the_expected_shape():
    with pytest.raises(ValueError, match=r"policy output: expected shape \(2, 2\), given \(2, 3\)"):
        evaluate(lambda obs: np.zeros((2, 3)), env_fn(), num_episodes=2, num_envs=2,
                 vectorization="sync")


def test_a_wrapper_that_ends_episodes_is_refused():
    with pytest.raises(RuntimeError, match="max_episode_steps"):
        evaluate(echo_policy, env_fn(), num_episodes=3, num_envs=1, seed=5, vectorization="sync",
                 wrappers=[lambda env: gym.wrappers.TimeLimit(env, 2)])


def test_max_episode_steps_cuts_episodes():
    res = evaluate(echo_policy, env_fn(), num_episodes=4, num_envs=2, seed=SEED,
                   vectorization="sync", max_episode_steps=2)
    assert [e["length"] for e in res["episodes"]] == [min(2, episode_length(SEED + k))
                                                      for k in range(4)]


@pytest.mark.parametrize("options, message", [
    ({"num_episodes": 0}, "num_episodes: expected >= 1, given 0"),
    ({"num_envs": 0}, "num_envs: expected >= 1, given 0"),
    ({"vectorization": "threads"}, "vectorization: expected 'async' or 'sync'"),
    ({"autoreset_mode": "sometimes"}, "autoreset_mode: expected one of"),
    ({"success_at": "first"}, "success_at: expected 'any' or 'final'"),
    ({"video_path": "eval.avi"}, "video_path: expected a .mp4 or .gif file"),
    ({"env_kwargs": {"x": 1}}, "env_kwargs: only for an env id"),
    ({"log_dir": "x", "log_options": {"incomplete": "keep"}}, "log_options: 'incomplete'"),
    ({"log_dir": "x"}, "log_name: required"),
])
def test_bad_options(options, message):
    kwargs = {"num_episodes": 2, "num_envs": 1, "vectorization": "sync", **options}
    with pytest.raises(ValueError, match=message):
        evaluate(echo_policy, env_fn(), **kwargs)


def test_autoreset_mode_by_name():
    for name in ("next_step", "SameStep", "DISABLED"):
        res = evaluate(echo_policy, env_fn(), num_episodes=3, num_envs=2, seed=SEED,
                       vectorization="sync", autoreset_mode=name)
        assert res["episodes"] == expected_episodes(n=3)


def test_evaluation_episodes_join_a_dataset_collected_from_the_same_env(tmp_path):
    """run_gym's logger (AutoOXEEnvLogger) collects; evaluate logs into the same directory: one
    dataset (same features: cameras, state, language), collected then evaluated episodes."""
    from oxe_envlogger import AutoOXEEnvLogger
    from oxe_envlogger.envs import ENV_ID, make_policy, run_episodes

    kwargs = {"image_size": 32, "wrist_size": 16, "max_episode_steps": 10}
    directory = str(tmp_path / "camera")
    with AutoOXEEnvLogger(gym.make(ENV_ID, **kwargs), "camera", directory) as env:
        run_episodes(env, 2, policy=make_policy("scripted", env), seed=0)
    scripted = make_policy("scripted", gym.make(ENV_ID, **kwargs))
    res = evaluate(lambda obs, instruction: np.stack([
        scripted({k: v[i] for k, v in obs.items()}) for i in range(len(instruction))]),
        ENV_ID, env_kwargs=kwargs, num_episodes=3, num_envs=2, seed=100, log_dir=directory,
        log_name="camera", instruction=TaskInput(info_key="language_instruction"))
    logged = read_tfds(directory)
    assert len(logged) == 2 + 3
    evaluated = sorted(sum(ep["steps"]["reward"].tolist()) for ep in logged[2:])
    assert evaluated == sorted(e["return"] for e in res["episodes"])
    assert all(ep["steps"]["language_instruction"][0].startswith(b"put the") for ep in logged)


def test_an_id_registered_on_import_reaches_fresh_sub_env_processes():
    """A forkserver child has not imported oxe_envlogger.envs, which registers the id: the id
    travels as its spec (before: NamespaceNotFound in the sub-env)."""
    from oxe_envlogger.envs import ENV_ID

    res = evaluate(lambda obs: np.zeros((2, 7), np.float32), ENV_ID, num_episodes=2, num_envs=2,
                   context="forkserver",
                   env_kwargs={"image_size": 32, "wrist_size": 16, "max_episode_steps": 3})
    assert [e["length"] for e in res["episodes"]] == [3, 3]


def test_an_unknown_id_fails_here():
    with pytest.raises(gym.error.NameNotFound):
        evaluate(echo_policy, "NoSuchEnv-v0", num_episodes=1)
