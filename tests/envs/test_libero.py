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


def test_all_init_states_start_with_the_official_ones():
    full, official = init_states("libero_spatial", 0, "all"), init_states("libero_spatial", 0)
    assert full.shape[0] == 100 and np.array_equal(full[:50], official)
    assert len({x.tobytes() for x in full}) == 100
    # libero_object ships the same 50 states twice; libero_goal ships no superset (as the original LIBERO)
    for suite in ("libero_object", "libero_goal"):
        assert np.array_equal(init_states(suite, 0, "all"), init_states(suite, 0))


def test_openpi_stream_gives_each_episode_the_layout_of_a_sequential_run():
    """openpi seeds a task's env once and resets it for episode 0, 1, 2, ...: each reset draws new fixture poses.
    Replayed streams give episode k that layout in a fresh env, in any order (as different workers would)."""
    from libero.libero.envs import OffScreenRenderEnv

    task, states = resolve_tasks("libero_spatial", [0])[0], init_states("libero_spatial", 0)
    reference = OffScreenRenderEnv(bddl_file_name=task.bddl_file, camera_heights=64, camera_widths=64)
    reference.seed(7)
    expected = []
    for k in range(3):
        reference.reset()
        reference.set_init_state(states[k])
        expected.append(reference.env.sim.model.body_pos.copy())
        for _ in range(3):  # episode steps draw nothing from the stream
            reference.step(np.array([0.5, 0, 0, 0, 0, 0, -1.0]))
    reference.close()
    assert not np.array_equal(expected[0], expected[1]) and not np.array_equal(expected[1], expected[2])

    env = LiberoEnv(LiberoEnvConfig(suite="libero_spatial", resolution=64, num_steps_wait=0))
    streams = env.reset_streams(0, 3, seed=7)
    for k in (2, 0, 1):
        env.set_render(False)
        env.reset(options={"task_id": 0, "init_state": k, "rng_state": streams[k]})
        np.testing.assert_array_equal(env.sim.model.body_pos, expected[k])
    env.set_render(False)
    env.reset(seed=7, options={"task_id": 0, "init_state": 1})  # per-episode seeding: always episode 0's layout
    np.testing.assert_array_equal(env.sim.model.body_pos, expected[0])
    env.close()


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
