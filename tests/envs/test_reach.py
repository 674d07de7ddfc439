"""The reach task: LIBERO protocol and observation format, determinism, rendering, calibration, EnvPool."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import numpy as np
import pytest

from pi0_lightning.envs.libero import TaskInfo
from pi0_lightning.envs.pool import EnvPool, WorkerFailure
from pi0_lightning.envs.reach import (
    TARGET_POSITIONS,
    TARGET_RGB,
    TASKS,
    ReachEnv,
    ReachEnvConfig,
    expert_action,
    reach_init_states,
    reach_norm_stats,
    reach_tasks,
    task_language,
)

PolicyFn = Callable[[dict, int, np.random.Generator], np.ndarray]


def simulate_success_rate(
    policy_fn: PolicyFn, episodes: int, seed: int, config: ReachEnvConfig | None = None, hold: int = 1
) -> tuple[float, np.ndarray]:
    """Success rate of `policy_fn(obs, task_id, rng) -> action` over episodes with uniformly drawn tasks and init
    states (no rendering); the action is recomputed every `hold` steps. Returns (overall, per-task rates)."""
    config = config or ReachEnvConfig()
    env = ReachEnv(config)
    rng = np.random.default_rng(seed)
    wins = np.zeros(config.num_tasks)
    runs = np.zeros(config.num_tasks)
    for _ in range(episodes):
        task = int(rng.integers(config.num_tasks))
        env.set_render(False)
        obs, _ = env.reset(options={"task_id": task, "init_state": int(rng.integers(config.num_init_states))})
        for t in range(config.max_steps):
            if t % hold == 0:
                action = policy_fn(obs, task, rng)
            env.set_render(False)
            obs, _, terminated, truncated, info = env.step(action)
            if terminated or truncated:
                break
        runs[task] += 1
        wins[task] += info["success"]
    return float(wins.sum() / runs.sum()), wins / np.maximum(runs, 1)


def random_policy(obs: dict, task: int, rng: np.random.Generator) -> np.ndarray:
    """A z-scored model action ~ N(0, 1) unnormalised with std 0.5: env action ~ N(0, 0.5^2) per dim."""
    return rng.normal(0.0, 0.5, 7)


def straight_policy(obs: dict, task: int, rng: np.random.Generator) -> np.ndarray:
    return expert_action(obs["eef_pos"], task)


def upright(img: np.ndarray) -> np.ndarray:
    return img[::-1, ::-1]


def centroid(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return np.array([rows.mean(), cols.mean()])


# ------------------------------------------------------------------------------------------------------ protocol


def test_observations_render_flag_and_limits():
    cfg = ReachEnvConfig(max_steps=3)
    env = ReachEnv(cfg)
    obs, info = env.reset(options={"task_id": 2, "init_state": 5})
    assert info == {"task_id": 2, "init_state": 5} and env.language == "reach the blue target"
    assert set(obs) == {"agentview", "wrist", "eef_pos", "eef_quat", "gripper_qpos"}
    for key in ("agentview", "wrist"):
        assert obs[key].shape == (64, 64, 3) and obs[key].dtype == np.uint8 and obs[key].flags.c_contiguous
    for key, shape in (("eef_pos", (3,)), ("eef_quat", (4,)), ("gripper_qpos", (2,))):
        assert obs[key].shape == shape and obs[key].dtype == np.float64
    np.testing.assert_array_equal(obs["eef_pos"][:2], reach_init_states(cfg, 2)[5])
    assert obs["eef_pos"][2] == 0 and obs["eef_quat"].tolist() == [0, 0, 0, 1] and not obs["gripper_qpos"].any()

    env.set_render(False)  # applies to the next call only
    obs, reward, terminated, truncated, info = env.step(np.zeros(7))
    assert set(obs) == {"eef_pos", "eef_quat", "gripper_qpos"}
    assert (reward, terminated, truncated, info) == (0.0, False, False, {"success": False, "steps": 1})
    obs, *_ = env.step(np.zeros(7))
    assert "agentview" in obs
    env.set_render(False)
    assert "agentview" not in env.reset(options={"init_state": 0})[0]  # reset obeys it too; the task is kept
    assert env.task_id == 2
    results = [env.step(np.zeros(7)) for _ in range(3)]
    assert [r[3] for r in results] == [False, False, True] and not any(r[2] for r in results)
    assert results[-1][4] == {"success": False, "steps": 3}


def test_success_terminates_with_reward():
    env = ReachEnv(ReachEnvConfig())
    obs, _ = env.reset(options={"task_id": 1, "init_state": 0})
    for _ in range(10):
        obs, reward, terminated, truncated, info = env.step(expert_action(obs["eef_pos"], 1))
        if terminated:
            break
    assert (reward, terminated, truncated, info["success"]) == (1.0, True, False, True)
    assert np.linalg.norm(obs["eef_pos"][:2] - TARGET_POSITIONS[1]) <= env.config.goal_radius


def test_action_clipping_and_ignored_dims():
    cfg = ReachEnvConfig()
    env = ReachEnv(cfg)
    env.set_render(False)
    start = env.reset(options={"task_id": 0, "init_state": 3})[0]["eef_pos"]
    env.set_render(False)
    obs = env.step(np.array([5.0, -0.4, 9, 9, 9, 9, -1]))[0]
    np.testing.assert_allclose(obs["eef_pos"][:2] - start[:2], [cfg.step_scale, -0.4 * cfg.step_scale])
    with pytest.raises(ValueError, match="finite"):
        env.step(np.array([np.nan, 0, 0, 0, 0, 0, 0]))
    with pytest.raises(RuntimeError, match="reset"):
        ReachEnv().step(np.zeros(7))


def test_tasks_and_unknown_task():
    assert TASKS == (
        "reach the red target",
        "reach the green target",
        "reach the blue target",
        "reach the yellow target",
    )
    assert task_language(3) == "reach the yellow target"
    tasks = reach_tasks(ReachEnvConfig(num_tasks=2, num_init_states=7))
    assert all(isinstance(t, TaskInfo) for t in tasks)
    assert [(t.suite, t.task_id, t.name, t.num_eval_init_states) for t in tasks] == [
        ("reach", 0, "reach_the_red_target", 7),
        ("reach", 1, "reach_the_green_target", 7),
    ]
    with pytest.raises(ValueError, match="valid tasks: 0: reach the red target; 1: reach the green target; 2"):
        task_language(4)
    env = ReachEnv(ReachEnvConfig(num_tasks=2))
    with pytest.raises(ValueError, match=r"unknown reach task 2; valid tasks: 0: reach the red.*1: reach the green"):
        env.reset(options={"task_id": 2})
    with pytest.raises(ValueError, match="init_state 50 out of range"):
        env.reset(options={"task_id": 0, "init_state": 50})
    with pytest.raises(ValueError, match="goal_radius"):
        ReachEnvConfig(goal_radius=0.5)


def test_deterministic_init_states_and_observations():
    cfg = ReachEnvConfig()
    starts = reach_init_states(cfg, 0)
    assert starts.shape == (50, 2) and np.linalg.norm(starts, axis=1).max() <= 0.3
    assert len({tuple(s) for s in starts}) == 50
    assert not np.array_equal(starts, reach_init_states(cfg, 1))  # each task has its own starts
    assert not np.array_equal(starts, reach_init_states(ReachEnvConfig(seed=8), 0))
    a, b = ReachEnv(cfg), ReachEnv(cfg)
    actions = np.random.default_rng(1).normal(0, 0.5, (4, 7))
    for env in (a, b):
        env.reset(options={"task_id": 3, "init_state": 1})  # a different state first: no leftovers
    runs = []
    for env in (a, b):
        obs = [env.reset(options={"task_id": 0, "init_state": 7})[0]] + [env.step(x)[0] for x in actions]
        runs.append(obs)
    for o1, o2 in zip(*runs, strict=True):
        assert o1.keys() == o2.keys() and all(np.array_equal(o1[k], o2[k]) for k in o1)


# ------------------------------------------------------------------------------------------------------ rendering


def test_rendering_orientation_and_agent_motion():
    env = ReachEnv(ReachEnvConfig())
    obs, _ = env.reset(options={"task_id": 0, "init_state": 0})
    view = upright(obs["agentview"])
    s = view.shape[0]
    # upright view: +x to the right, +y up; red (-0.5, 0.5) top-left, yellow (0.5, -0.5) bottom-right
    for target, rgb in zip(TARGET_POSITIONS, TARGET_RGB, strict=True):
        expected = np.array([(1 - target[1]) / 2 * s, (target[0] + 1) / 2 * s]) - 0.5
        np.testing.assert_allclose(centroid((view == rgb).all(-1)), expected, atol=0.6)
    white = (view == 255).all(-1)
    x, y = obs["eef_pos"][:2]
    np.testing.assert_allclose(centroid(white), [(1 - y) / 2 * s - 0.5, (x + 1) / 2 * s - 0.5], atol=0.6)
    # the wrist view is centred on the agent
    np.testing.assert_allclose(centroid((upright(obs["wrist"]) == 255).all(-1)), [s / 2 - 0.5] * 2, atol=0.6)

    moved, *_ = env.step(np.array([1.0, -1.0, 0, 0, 0, 0, 0]))  # right and down
    new_white = (upright(moved["agentview"]) == 255).all(-1)
    shift = centroid(new_white) - centroid(white)
    assert shift[0] > 5 and shift[1] > 5  # rows grow downwards, columns to the right: 0.25 world = 8 px
    assert not np.array_equal(moved["agentview"], obs["agentview"])
    assert not np.array_equal(moved["wrist"], obs["wrist"])

    plain = ReachEnv(ReachEnvConfig(render_wrist=False, image_size=32)).reset()[0]
    assert plain["wrist"].shape == (32, 32, 3) and not plain["wrist"].any() and plain["agentview"].any()


def test_policy_transforms_accept_the_observations():
    from pi0_lightning.policy.transforms import LiberoTransforms, Normalizer, libero_state

    transforms = LiberoTransforms(normalizer=Normalizer.from_json(reach_norm_stats()), delta_actions=False)
    obs = ReachEnv().reset(options={"task_id": 1, "init_state": 2})[0]
    agent, wrist = transforms.camera_images(obs["agentview"], obs["wrist"])
    assert agent.shape == wrist.shape == (224, 224, 3) and agent.dtype == np.uint8
    state = libero_state(obs["eef_pos"], obs["eef_quat"], obs["gripper_qpos"])
    np.testing.assert_allclose(state, [*obs["eef_pos"][:2], 0, 0, 0, 0, 0, 0], atol=1e-7)
    np.testing.assert_allclose(transforms.normalized_state(state[None])[0, :8], state, atol=1e-5)
    # z-score: model N(0, 1) -> env N(0, 0.5^2), the calibrated random policy
    model = np.random.default_rng(0).normal(size=(1, 50, 32)).astype(np.float32)
    env_actions = transforms.outputs(model, state[None])
    assert env_actions.shape == (1, 50, 7)
    np.testing.assert_allclose(env_actions, model[..., :7] * 0.5, rtol=1e-5, atol=1e-6)
    quantile = Normalizer.from_json(reach_norm_stats(), mode="quantile")
    np.testing.assert_allclose(
        quantile.unnormalize_actions(np.array([[-1.0] * 7, [1.0] * 7])), [[-1] * 7, [1] * 7], atol=1e-5
    )
    np.testing.assert_allclose(quantile.normalize_state([[1, -1, 0, 0, 0, 0, 0, 0]])[0, :2], [1, -1], atol=1e-5)


# ---------------------------------------------------------------------------------------------------- calibration


def test_straight_policy_always_succeeds():
    cfg = ReachEnvConfig()
    env = ReachEnv(cfg)
    for task in range(cfg.num_tasks):
        for k in range(cfg.num_init_states):
            env.set_render(False)
            obs, _ = env.reset(options={"task_id": task, "init_state": k})
            for _ in range(cfg.max_steps):
                env.set_render(False)
                obs, _, terminated, truncated, info = env.step(expert_action(obs["eef_pos"], task))
                if terminated or truncated:
                    break
            assert info["success"] and info["steps"] <= 2, (task, k, info)


def test_random_policy_success_rate_in_band():
    rate, per_task = simulate_success_rate(random_policy, episodes=500, seed=0)
    assert 0.12 <= rate <= 0.4, rate
    assert (per_task > 0.05).all() and (per_task < 0.6).all(), per_task
    never = simulate_success_rate(lambda obs, task, rng: np.zeros(7), episodes=50, seed=0)[0]
    assert never == 0.0  # no start is inside a target


def test_step_and_reset_are_cheap():
    env = ReachEnv()
    action = np.full(7, 0.01)
    t0 = time.perf_counter()
    for _ in range(200):
        env.set_render(False)
        env.reset(options={"task_id": 1, "init_state": 3})
        env.set_render(False)
        env.step(action)
    blind = (time.perf_counter() - t0) / 400
    t0 = time.perf_counter()
    for _ in range(50):
        env.step(action)
    rendered = (time.perf_counter() - t0) / 50
    assert blind < 1e-3 and rendered < 5e-3, (blind, rendered)  # generous: typically ~5 us and ~0.2 ms


# ------------------------------------------------------------------------------------------------------ env pool


def test_runs_in_env_pool():
    cfg = ReachEnvConfig(image_size=32, max_steps=5)
    with EnvPool(functools.partial(ReachEnv, cfg), 2, timeout_s=60) as pool:
        out = pool.reset([0, 1], options=[{"task_id": 0, "init_state": 1}, {"task_id": 3, "init_state": 2}])
        assert not any(isinstance(r, WorkerFailure) for r in out)
        assert [info["task_id"] for _, info in out] == [0, 3]
        assert out[0][0]["agentview"].shape == (32, 32, 3)
        local = ReachEnv(cfg)
        expected = local.reset(options={"task_id": 3, "init_state": 2})[0]
        np.testing.assert_array_equal(out[1][0]["agentview"], expected["agentview"])
        for i in range(3):
            res = pool.step([0, 1], [np.full(7, 0.3), np.full(7, -0.3)], render=[i == 2, False])
            assert not any(isinstance(r, WorkerFailure) for r in res)
        (obs0, *_, info0), (obs1, *_, info1) = res
        assert "agentview" in obs0 and "agentview" not in obs1 and info0["steps"] == info1["steps"] == 3
        for _ in range(3):
            last = local.step(np.full(7, -0.3))[0]
        np.testing.assert_array_equal(obs1["eef_pos"], last["eef_pos"])
        assert pool.restarts == 0
