"""LIBERO-PRO perturbation suites: the catalogue against the package's files and registry, and one task of each
perturbation suite built, reset to a shipped initial state and stepped with the plain LIBERO API."""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import pytest

pytest.importorskip("libero.libero", reason="LIBERO is not installed (pip install 'pi0-lightning[libero]')")

from pi0_lightning.envs import libero_pro  # noqa: E402
from pi0_lightning.envs.libero import (  # noqa: E402
    SUITE_MAX_STEPS,
    LiberoEnv,
    LiberoEnvConfig,
    init_states,
    resolve_tasks,
)

DUMMY = np.array([0.0] * 6 + [-1.0])
EMPTY = {("libero_object_temp_y0.5", 1)}  # the one shipped state file with no states


def _registry(suite: str):
    from libero.libero import benchmark

    with contextlib.redirect_stdout(io.StringIO()):
        return benchmark.get_benchmark_dict()[suite]()


def test_catalogue_matches_the_shipped_files():
    assert len(libero_pro.PRO_SUITES) == 26 and set(libero_pro.PRO_SUITES) == set(libero_pro.PERTURBATION)
    assert set(libero_pro.PRO_SUITES.values()) <= set(SUITE_MAX_STEPS)
    for suite, base in libero_pro.PRO_SUITES.items():
        tasks, base_tasks = libero_pro.pro_tasks(suite), resolve_tasks(base)
        assert [t.name for t in tasks] == [t.name for t in base_tasks], suite
        changed = libero_pro.PERTURBATION[suite] in ("language", "task")
        for i, (task, base_task) in enumerate(zip(tasks, base_tasks, strict=True)):
            assert os.path.isabs(task.bddl_file) and os.path.isfile(task.bddl_file)
            assert task.bddl_file.endswith(os.path.join(suite, task.name + ".bddl"))
            assert (task.language != base_task.language) == changed, (suite, i)
            states = libero_pro.init_states(suite, i)
            if (suite, i) in EMPTY:
                assert task.num_init_states == 0
                continue
            assert task.num_init_states == 50 and states.shape == (50, init_states(base, i).shape[1]), (suite, i)


def test_registered_suites_agree_with_the_registry():
    registered = [s for s in libero_pro.PRO_SUITES if not s.startswith("libero_object_temp_")]
    assert len(registered) == 16
    for suite in registered:
        reg = _registry(suite)
        for i, task in enumerate(libero_pro.pro_tasks(suite)):
            assert os.path.samefile(reg.get_task_bddl_file_path(i), task.bddl_file)
            np.testing.assert_array_equal(reg.get_task_init_states(i), libero_pro.init_states(suite, i))
    # the registry's language comes from the file name: the base instruction, not the paraphrase in the bddl file
    assert _registry("libero_goal_lan").get_task(0).language == resolve_tasks("libero_goal")[0].language
    with pytest.raises(ValueError, match="valid suites: libero_spatial_lan"):
        libero_pro.pro_tasks("libero_goal_env")


@pytest.mark.slow
@pytest.mark.parametrize("suite", list(libero_pro.PRO_SUITES))
def test_builds_resets_and_steps_through_our_env(suite):
    """Task 0 of every perturbation suite through `LiberoEnv` (openpi's reset: shipped init state, wait steps)."""
    env = LiberoEnv(LiberoEnvConfig(suite=suite, resolution=128, num_steps_wait=2, hard_reset=False))
    try:
        obs, info = env.reset(options={"task_id": 0, "init_state": 0})
        if libero_pro.PERTURBATION[suite] in ("language", "task"):
            assert env._env.language_instruction == resolve_tasks(suite, [0])[0].language
        assert env.config.episode_steps == SUITE_MAX_STEPS[libero_pro.PRO_SUITES[suite]]
        assert obs["agentview"].shape == (128, 128, 3) and obs["agentview"].std() > 0  # the scene was rendered
        assert obs["eef_pos"].shape == (3,) and obs["gripper_qpos"].shape == (2,)
        t0 = env.sim.data.time
        obs, reward, terminated, truncated, _ = env.step(DUMMY)
        assert env.sim.data.time > t0 and not terminated and not truncated and reward == 0.0
    finally:
        env.close()
