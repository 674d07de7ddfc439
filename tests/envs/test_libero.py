"""The real LIBERO environment on CPU (one task, a few short steps): observations, limits, render-on-use."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("libero.libero", reason="LIBERO is not installed (pip install 'pi0-lightning[libero]')")

from pi0_lightning.envs.libero import (  # noqa: E402
    LiberoEnv,
    LiberoEnvConfig,
    UnknownTaskError,
    init_states,
    resolve_tasks,
)


def test_tasks_and_instructions():
    tasks = resolve_tasks("libero_spatial")
    assert len(tasks) == 10 and tasks[0].num_eval_init_states == 50
    assert tasks[0].language.startswith("pick up the black bowl")
    assert resolve_tasks("libero_spatial", "1,3")[1].task_id == 3
    assert resolve_tasks("libero_spatial", [tasks[2].name])[0].task_id == 2
    # the 50 official states are a subset of the 100 shipped ones
    full, official = init_states("libero_spatial", 0, "all"), init_states("libero_spatial", 0)
    assert full.shape[0] == 100 and all((np.abs(full - s).max(1) == 0).any() for s in official)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(UnknownTaskError, match="valid suites: libero_spatial, libero_object"):
        resolve_tasks("libero_nope")
    with pytest.raises(UnknownTaskError, match="valid tasks: 0: pick_up_the_black_bowl"):
        resolve_tasks("libero_spatial", ["make coffee"])
    with pytest.raises(UnknownTaskError, match="tasks 0..9"):
        resolve_tasks("libero_spatial", "12")


@pytest.fixture(scope="module")
def rollouts():
    """The same actions from the same state, once rendering every step and once only every third step."""
    actions = np.random.default_rng(0).uniform(-0.5, 0.5, (6, 7))
    runs = []
    for every in (1, 3):
        env = LiberoEnv(LiberoEnvConfig(suite="libero_spatial", max_steps=6, num_steps_wait=2))
        first, _ = env.reset(options={"task_id": 0, "init_state": 0})
        steps = []
        for i, a in enumerate(actions):
            env.set_render((i + 1) % every == 0)
            steps.append(env.step(a))
        env.close()
        runs.append((first, steps))
    return runs


def test_observations_and_episode_limit(rollouts):
    first, steps = rollouts[0]
    assert first["agentview"].shape == (256, 256, 3) and first["agentview"].dtype == np.uint8
    assert first["wrist"].shape == (256, 256, 3)
    assert first["eef_pos"].shape == (3,) and first["eef_quat"].shape == (4,) and first["gripper_qpos"].shape == (2,)
    *_, (obs, reward, terminated, truncated, info) = steps
    assert not terminated and truncated and info["steps"] == 6 and reward == 0.0
    assert not any(s[3] for s in steps[:-1])


def test_render_on_use_has_identical_physics_and_pixels(rollouts):
    (first_a, steps_a), (first_b, steps_b) = rollouts
    assert np.array_equal(first_a["agentview"], first_b["agentview"])
    for i, ((a, *_), (b, *_)) in enumerate(zip(steps_a, steps_b, strict=True)):
        for key in ("eef_pos", "eef_quat", "gripper_qpos"):
            assert np.array_equal(a[key], b[key]), (i, key)
        if (i + 1) % 3 == 0:
            assert np.array_equal(a["agentview"], b["agentview"]) and np.array_equal(a["wrist"], b["wrist"])
        else:
            assert "agentview" not in b  # not rendered
