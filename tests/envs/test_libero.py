"""The real LIBERO environment on CPU (one task, a few short steps): observations, limits, render-on-use."""

from __future__ import annotations

from types import SimpleNamespace

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
    _, info = env.reset(seed=7, options={"task_id": 0, "init_state": 1})  # per-episode seeding: episode 0's layout
    np.testing.assert_array_equal(env.sim.model.body_pos, expected[0])
    assert info["init_state"] == 1 and 0 < info["reset_seconds"] < 60
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


def test_prepared_images_are_the_policy_transform_of_the_render():
    """`image_size`: both cameras come back as the policy's own transform makes them of the same render (upright,
    resized with padding), flagged "images_prepared"; proprio is unchanged; a step without images carries no flag."""
    from pi0_lightning.policy.transforms import PREPARED_IMAGES_KEY, prepare_camera_images

    action = np.array([0.3, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0])
    runs = []
    for size in (None, 32):
        env = LiberoEnv(LiberoEnvConfig(suite="libero_spatial", resolution=64, num_steps_wait=1, image_size=size))
        first, _ = env.reset(seed=7, options={"task_id": 0, "init_state": 0})
        stepped = env.step(action)[0]
        env.set_render(False)
        blind = env.step(action)[0]
        env.close()
        runs.append((env.observation_space["agentview"].shape, [first, stepped, blind]))
    (raw_shape, raw), (shape, prepared) = runs
    assert raw_shape == (64, 64, 3) and shape == (32, 32, 3)
    for r, p in zip(raw[:2], prepared[:2], strict=True):
        assert p[PREPARED_IMAGES_KEY] is True and PREPARED_IMAGES_KEY not in r
        agent, wrist = prepare_camera_images(r["agentview"], r["wrist"], 32)
        np.testing.assert_array_equal(p["agentview"], agent)
        np.testing.assert_array_equal(p["wrist"], wrist)
    for r, p in zip(raw, prepared, strict=True):
        for key in ("eef_pos", "eef_quat", "gripper_qpos"):
            np.testing.assert_array_equal(p[key], r[key])
    assert set(prepared[2]) == {"eef_pos", "eef_quat", "gripper_qpos"}


def test_the_data_module_starts_workers_that_prepare_images_at_the_policys_size():
    """The env spec is built before the model; the data module starts its LIBERO workers with the policy's image
    size (`EnvSpec.env_factory`), the reach env keeps its renders."""
    from dataclasses import replace
    from types import SimpleNamespace

    from pi0_lightning.envs.spec import EnvConfig, build_env_spec
    from pi0_lightning.lit.datamodule import RolloutDataModule
    from pi0_lightning.policy.transforms import PREPARED_IMAGES_KEY

    cfg = EnvConfig(name="libero", tasks="0", num_workers=1, resolution=64, num_steps_wait=0)
    spec = build_env_spec(cfg)
    assert spec.env_factory(None) is spec.factory and spec.factory.args[0].image_size is None
    assert spec.env_factory(112).args[0] == replace(spec.factory.args[0], image_size=112)
    reach = build_env_spec(EnvConfig(name="reach"))
    assert reach.env_factory(112) is reach.factory and not reach.prepares_images(112)

    dm = RolloutDataModule(env=cfg, progress=False)
    dm.setup("fit")
    assert dm.pool is None  # started at first use, when the policy exists
    policy = SimpleNamespace(transforms=SimpleNamespace(image_size=32))
    try:
        pool = dm.env_pool(policy)
        assert dm.env_image_size == 32 and dm.env_pool(policy) is pool
        ((obs, _),) = pool.reset([0], options=[{"task_id": 0, "init_state": 0}])
        assert obs["agentview"].shape == obs["wrist"].shape == (32, 32, 3) and obs[PREPARED_IMAGES_KEY] is True
    finally:
        dm.teardown("fit")


def test_each_reset_can_choose_its_kind():
    """An env configured for hard resets resets softly when a request asks (and the other way round): the soft reset
    reuses the simulator and, cleared of the previous episode's leftovers, starts where the hard reset starts."""
    env = LiberoEnv(LiberoEnvConfig(suite="libero_spatial", resolution=64, num_steps_wait=2))
    try:
        env.set_render(False)
        env.reset(seed=3, options={"task_id": 0, "init_state": 1})
        sim = env.sim
        for _ in range(3):  # leave something behind: a moved arm and a closing gripper
            env.set_render(False)
            env.step(np.array([0.5, 0.2, 0.0, 0.0, 0.0, 0.0, 1.0]))
        env.set_render(False)
        soft, _ = env.reset(seed=3, options={"task_id": 0, "init_state": 0, "hard_reset": False})
        assert env.sim is sim  # nothing rebuilt
        soft_qpos = env.sim.data.qpos.copy()
        env.set_render(False)
        hard, _ = env.reset(seed=3, options={"task_id": 0, "init_state": 0})
        assert env.sim is not sim  # rebuilt
        np.testing.assert_array_equal(env.sim.data.qpos, soft_qpos)
        for key in ("eef_pos", "eef_quat", "gripper_qpos"):
            np.testing.assert_array_equal(soft[key], hard[key])
    finally:
        env.close()


def test_training_rollouts_reset_softly_and_validation_as_configured(monkeypatch):
    from pi0_lightning.envs.spec import EnvConfig
    from pi0_lightning.lit import datamodule as dm_module
    from pi0_lightning.rollout.types import EpisodeRequest

    seen = []

    class Recorder:
        def __init__(self, pool, policy, config):
            pass

        def collect(self, requests, desc):
            seen.append([r.hard_reset for r in requests])
            return [], None

    monkeypatch.setattr(dm_module, "RolloutCollector", Recorder)
    dm = dm_module.RolloutDataModule(env=EnvConfig(name="libero", tasks="0"), progress=False)
    dm.spec = SimpleNamespace(max_steps=10)
    monkeypatch.setattr(dm, "env_pool", lambda policy: None)
    requests = [EpisodeRequest(0, k, "task") for k in range(2)]
    dm._collect(None, requests, 0, "train")
    dm._collect(None, requests, 0, "eval", evaluation=True)
    assert seen == [[False, False], [True, True]] and requests[0].hard_reset is None
