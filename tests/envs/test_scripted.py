"""The scripted LIBERO expert: its geometry helpers, real pick-and-place episodes, and the dataset command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pi0_lightning.envs.scripted import Footprint, _axis_angle, _down_frame


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


@pytest.mark.parametrize("angle", [0.0, 0.3, 1.5, 3.0, math.pi - 1e-4])
def test_axis_angle_inverts_rodrigues(angle):
    axis = np.array([0.3, -0.5, 0.8])
    vector = _axis_angle(_rotation(axis, angle))
    expected = axis / np.linalg.norm(axis) * angle
    # a half turn about v equals one about -v
    assert np.allclose(vector, expected, atol=1e-3) or np.allclose(vector, -expected, atol=1e-3)


def test_down_frame_points_the_fingers_along_the_axis():
    frame = _down_frame(np.array([1.0, 1.0]))
    assert np.allclose(frame.T @ frame, np.eye(3)) and np.isclose(np.linalg.det(frame), 1.0)
    assert np.allclose(frame[:, 2], [0, 0, -1]) and np.allclose(frame[:, 0], [2**-0.5, 2**-0.5, 0])


def test_footprint_of_a_rotated_box():
    """An 8 x 4 x 2 cm box turned 30 degrees: the narrow axis is its short side, widths and heights are exact."""
    corners = np.array([[x, y, z] for x in (-0.04, 0.04) for y in (-0.02, 0.02) for z in (0.0, 0.02)])
    yaw = math.radians(30)
    points = corners @ _rotation(np.array([0, 0, 1.0]), yaw).T + [0.1, -0.2, 0.9]
    box = Footprint.of(points)
    assert np.allclose(box.center, [0.1, -0.2]) and np.isclose(box.top, 0.92) and np.isclose(box.bottom, 0.9)
    assert np.isclose(box.narrow_width, 0.04) and np.isclose(box.long_width, 0.08)
    assert np.isclose(abs(np.dot(box.narrow_axis, [-math.sin(yaw), math.cos(yaw)])), 1.0)
    assert np.isclose(box.radius, math.hypot(0.04, 0.02))


# ---------------------------------------------------------------------------------------------------------------
# on the real simulator

libero = pytest.importorskip("libero.libero", reason="LIBERO is not installed (pip install 'pi0-lightning[libero]')")


@pytest.fixture(scope="module")
def expert_env():
    from pi0_lightning.envs.libero import LiberoEnvConfig
    from pi0_lightning.envs.scripted import ExpertLiberoEnv

    env = ExpertLiberoEnv(LiberoEnvConfig(suite="libero_spatial", resolution=64, hard_reset=False))
    yield env
    env.close()


def test_expert_places_the_bowl_on_the_plate(expert_env):
    """A rim grasp of a bowl wider than the gripper, carried and set down centred on the plate (LIBERO's own success
    check: on top, in contact, centres within 3 cm)."""
    episode = expert_env.demonstrate(task_id=0, init_state=0, record=True, seed=0)
    assert episode.success and episode.phase in ("release", "retreat")
    n = episode.steps
    assert 40 < n < 220 and episode.images.shape == (n, 64, 64, 3) and episode.wrist_images.shape == (n, 64, 64, 3)
    assert episode.state.shape == (n, 8) and episode.actions.shape == (n, 7)
    assert np.all(np.abs(episode.actions) <= 1.0)
    # the gripper opens (-1) at the start and closes (+1) for the grasp
    assert episode.actions[0, 6] == -1.0 and (episode.actions[:, 6] == 1.0).sum() >= 12


def test_same_seed_same_episode(expert_env):
    first = expert_env.demonstrate(task_id=5, init_state=3, record=False, seed=11)
    second = expert_env.demonstrate(task_id=5, init_state=3, record=False, seed=11)
    assert first.success and (first.steps, first.phase) == (second.steps, second.phase)


def test_unsupported_goals_are_named():
    from pi0_lightning.envs.scripted import UnsupportedTaskError, check_scriptable, scriptable_tasks

    with pytest.raises(UnsupportedTaskError, match="libero_goal task 0 .*open"):
        check_scriptable("libero_goal", [0])
    assert scriptable_tasks("libero_spatial") == list(range(10))
    goal = scriptable_tasks("libero_goal")
    assert goal == [1, 2, 4, 6, 8, 9]  # not: drawers (0, 3), the plate push (5), the stove's knob (7)
    with pytest.raises(UnsupportedTaskError, match="drawer must be opened"):
        check_scriptable("libero_goal", [3])


def test_command_writes_a_dataset_of_successful_demonstrations(tmp_path, capsys):
    from pi0_lightning.data.lerobot import LeRobotSource
    from pi0_lightning.envs.scripted import main

    out, report = tmp_path / "demos", tmp_path / "report.json"
    argv = ["--suite", "libero_object", "--tasks", "2", "--episodes", "2", "--workers", "2", "--resolution", "64"]
    assert main([*argv, "--out", str(out), "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "| 2 | pick up the salad dressing and place it in the basket | 2/2 |" in printed
    rows = json.loads(report.read_text())["tasks"]
    assert rows[0]["successes"] == 2 and rows[0]["episodes"] == 2
    source = LeRobotSource(out)
    assert [e.task for e in source.episodes] == ["pick up the salad dressing and place it in the basket"] * 2
    image, wrist = source.frame_images(1, 0)
    assert image.shape == wrist.shape == (64, 64, 3)
    state, actions = source.columns(1)
    assert state.shape[1] == 8 and actions.shape[1] == 7 and len(state) == source.episodes[1].length
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # the spool is gone


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--suite", "libero_goal", "--tasks", "0", "--evaluate"], "libero_goal task 0"),
        (["--suite", "libero_object", "--tasks", "12", "--evaluate"], "tasks 0..9"),
        (["--suite", "libero_nope", "--evaluate"], "unknown LIBERO suite"),
        (["--suite", "libero_object"], "--out DIR"),
        (["--suite", "libero_object", "--evaluate", "--resolution", "15"], "--resolution"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    from pi0_lightning.envs.scripted import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("scripted: error:") and message in err and "\n" not in err


def test_an_existing_dataset_is_not_touched(tmp_path, capsys):
    from pi0_lightning.envs.scripted import main

    out = tmp_path / "demos"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["--suite", "libero_object", "--tasks", "0", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
