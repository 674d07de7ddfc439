"""LIBERO's robomimic HDF5 demonstrations: order, tasks, upright frames, the 8-d state, actions and one-line errors,
on tiny files written with LIBERO's key names and attributes."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

from pi0_lightning.data.hdf5 import LiberoHDF5Source, task_from_filename
from pi0_lightning.data.source import DatasetError

SPATIAL = "pick_up_the_black_bowl_next_to_the_plate_and_place_it_on_the_plate_demo.hdf5"
LONG = "KITCHEN_SCENE3_turn_on_the_stove_and_put_the_moka_pot_on_it_demo.hdf5"
H = W = 16


def image(demo: int, t: int, wrist: bool) -> np.ndarray:
    """Frame-, demo- and camera-dependent content with no symmetry, so any flip or mix-up shows."""
    base = np.arange(H * W * 3, dtype=np.int64).reshape(H, W, 3)
    return ((base * 7 + t * 13 + demo * 29 + (101 if wrist else 0)) % 256).astype(np.uint8)


def axis_angle(demo: int, t: int) -> np.ndarray:
    axis = np.array([1.0, 2.0, 2.0 + demo]) / np.linalg.norm([1.0, 2.0, 2.0 + demo])
    return axis * (0.5 + 0.1 * t)


def quat_xyzw(aa: np.ndarray) -> np.ndarray:
    angle = float(np.linalg.norm(aa))
    return np.concatenate([aa / angle * math.sin(angle / 2), [math.cos(angle / 2)]])


def demo_arrays(demo: int, length: int) -> dict[str, np.ndarray]:
    t = np.arange(length, dtype=np.float64)[:, None]
    pos = np.concatenate([0.1 * t, 0.2 * t + demo, -0.3 * t], axis=1)
    ori = np.stack([axis_angle(demo, i) for i in range(length)])
    grip = np.concatenate([0.04 - 0.001 * t, -0.04 + 0.001 * t], axis=1)
    quats = np.stack([quat_xyzw(o) for o in ori])
    return {
        "agentview_rgb": np.stack([image(demo, i, False) for i in range(length)]),
        "eye_in_hand_rgb": np.stack([image(demo, i, True) for i in range(length)]),
        "ee_pos": pos,
        "ee_ori": ori,
        "ee_states": np.concatenate([pos, ori], axis=1),
        "gripper_states": grip,
        "joint_states": np.tile(np.arange(7.0), (length, 1)) + t,
        "robot_states": np.concatenate([grip, pos, quats], axis=1),
        "actions": np.concatenate([np.sin(t + demo + np.arange(6)), np.where(t % 2 == 0, -1.0, 1.0)], axis=1),
    }


def write_libero_file(path: Path, demos: dict[int, int], convention: str = "opengl", drop: tuple = ()) -> Path:
    """A LIBERO-layout demo file: ``demos`` maps demo number -> length; ``drop`` names obs keys left out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_name"] = "Libero_Tabletop_Manipulation"
        data.attrs["problem_info"] = json.dumps(
            {
                "problem_name": "libero_tabletop_manipulation",
                "domain_name": "robosuite",
                "language_instruction": "Pick up the black bowl and place it on the plate",
            }
        )
        data.attrs["macros_image_convention"] = convention
        data.attrs["bddl_file_name"] = "libero/libero/bddl_files/libero_spatial/task.bddl"
        data.attrs["env_args"] = json.dumps({"type": 1, "env_name": "Libero_Tabletop_Manipulation"})
        data.attrs["num_demos"] = len(demos)
        data.attrs["total"] = sum(demos.values())
        for number, length in demos.items():
            arrays = demo_arrays(number, length)
            grp = data.create_group(f"demo_{number}")
            grp.attrs["num_samples"] = length
            grp.attrs["model_file"] = "<mujoco/>"
            obs = grp.create_group("obs")
            for key in ("agentview_rgb", "eye_in_hand_rgb", "ee_pos", "ee_ori", "ee_states"):
                if key not in drop:
                    obs.create_dataset(key, data=arrays[key])
            for key in ("gripper_states", "joint_states"):
                if key not in drop:
                    obs.create_dataset(key, data=arrays[key])
            grp.create_dataset("actions", data=arrays["actions"])
            grp.create_dataset("robot_states", data=arrays["robot_states"])
            grp.create_dataset("states", data=np.zeros((length, 5)))
            grp.create_dataset("rewards", data=np.eye(1, length, length - 1, dtype=np.uint8)[0])
            grp.create_dataset("dones", data=np.eye(1, length, length - 1, dtype=np.uint8)[0])
    return path


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    root = tmp_path / "libero_mixed"
    write_libero_file(root / SPATIAL, {0: 6, 10: 8, 9: 7})
    write_libero_file(root / LONG, {1: 7, 2: 6})
    return root


def test_task_from_filename_follows_libero():
    assert task_from_filename(SPATIAL) == "pick up the black bowl next to the plate and place it on the plate"
    assert task_from_filename(LONG) == "turn on the stove and put the moka pot on it"
    assert task_from_filename("KITCHEN_SCENE10_put_the_butter_at_the_back_demo.hdf5") == "put the butter at the back"
    assert task_from_filename("LIVING_ROOM_SCENE2_pick_up_the_book_demo.hdf5") == "pick up the book"
    assert task_from_filename("pick_up_the_book.hdf5") is None


def test_episode_order_lengths_and_tasks(suite: Path):
    src = LiberoHDF5Source(suite)
    # Files sorted by name (upper case first), demos by number: demo_10 after demo_9.
    assert [p.name for p in src.files] == [LONG, SPATIAL]
    assert [(e.index, e.length) for e in src.episodes] == [(1, 7), (2, 6), (0, 6), (9, 7), (10, 8)]
    assert [e.task for e in src.episodes] == [task_from_filename(LONG)] * 2 + [task_from_filename(SPATIAL)] * 3
    assert src.episode_source(4) == (suite / SPATIAL, "demo_10")
    listed = LiberoHDF5Source([suite / SPATIAL, str(suite / LONG)])
    assert [(e.index, e.task) for e in listed.episodes] == [
        (e.index, e.task) for e in src.episodes[2:] + src.episodes[:2]
    ]
    assert len(LiberoHDF5Source(suite / LONG).episodes) == 2


def test_frames_are_rotated_180_and_otherwise_exact(suite: Path):
    src = LiberoHDF5Source(suite)
    for episode, demo in ((0, 1), (4, 10)):
        for frame in (0, 5):
            img, wrist = src.frame_images(episode, frame)
            assert img.dtype == np.uint8 and img.shape == (H, W, 3) and img.flags.c_contiguous
            np.testing.assert_array_equal(img, image(demo, frame, False)[::-1, ::-1])
            np.testing.assert_array_equal(wrist, image(demo, frame, True)[::-1, ::-1])
    with pytest.raises(IndexError):
        src.frame_images(0, 7)


def test_opencv_convention_needs_only_a_horizontal_flip(tmp_path: Path):
    # robosuite's "opencv" frames are the "opengl" renders flipped vertically; upright = opengl[::-1, ::-1].
    path = write_libero_file(tmp_path / SPATIAL, {0: 6}, convention="opencv")
    img, _ = LiberoHDF5Source(path).frame_images(0, 3)
    np.testing.assert_array_equal(img, image(0, 3, False)[:, ::-1])
    with h5py.File(path, "a") as f:
        f["data"].attrs["macros_image_convention"] = "directx"
    with pytest.raises(DatasetError, match="macros_image_convention"):
        LiberoHDF5Source(path)


def test_state_is_eef_pos_axis_angle_gripper_and_actions_exact(suite: Path):
    src = LiberoHDF5Source(suite)
    state, actions = src.columns(4)
    ref = demo_arrays(10, 8)
    assert state.dtype == np.float32 and state.shape == (8, 8) and actions.dtype == np.float32
    expected = np.concatenate([ref["ee_pos"], ref["ee_ori"], ref["gripper_states"]], axis=1).astype(np.float32)
    np.testing.assert_array_equal(state, expected)
    np.testing.assert_array_equal(actions, ref["actions"].astype(np.float32))


def test_state_fallbacks_and_explicit_keys(tmp_path: Path):
    ref = demo_arrays(0, 6)
    expected = np.concatenate([ref["ee_pos"], ref["ee_ori"], ref["gripper_states"]], axis=1).astype(np.float32)
    no_states = write_libero_file(tmp_path / "a" / SPATIAL, {0: 6}, drop=("ee_states",))
    np.testing.assert_array_equal(LiberoHDF5Source(no_states).columns(0)[0], expected)
    # Only robot_states (gripper, pos, xyzw quaternion): the quaternion goes through quat2axisangle.
    only_robot = write_libero_file(tmp_path / "b" / SPATIAL, {0: 6}, drop=("ee_states", "ee_pos", "ee_ori"))
    np.testing.assert_allclose(LiberoHDF5Source(only_robot).columns(0)[0], expected, atol=1e-6)
    keys = LiberoHDF5Source(no_states, state="joint_states, gripper_states").columns(0)[0]
    np.testing.assert_array_equal(
        keys, np.concatenate([ref["joint_states"], ref["gripper_states"]], 1).astype(np.float32)
    )


def test_pickles_without_handles_and_reopens(suite: Path):
    src = LiberoHDF5Source(suite)
    before = src.frame_images(3, 2)
    assert src._handles  # opened lazily by the read
    clone = pickle.loads(pickle.dumps(src))
    assert clone._handles == {}
    for a, b in zip(clone.frame_images(3, 2), before, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(clone.columns(1)[1], src.columns(1)[1])
    src.close()
    clone.close()


def test_task_falls_back_to_problem_info(tmp_path: Path):
    path = write_libero_file(tmp_path / "renamed.hdf5", {0: 6})
    assert LiberoHDF5Source(path).episodes[0].task == "Pick up the black bowl and place it on the plate"
    with h5py.File(path, "a") as f:
        del f["data"].attrs["problem_info"]
    with pytest.raises(DatasetError, match="no task instruction"):
        LiberoHDF5Source(path)


def _edit(path: Path, fn) -> Path:
    with h5py.File(path, "a") as f:
        fn(f)
    return path


def _replace(f: h5py.File, key: str, value: np.ndarray) -> None:
    del f[key]
    f[key] = value


@pytest.mark.parametrize(
    ("make", "kwargs", "match"),
    [
        (lambda d: d / "missing_demo.hdf5", {}, "no such file or directory"),
        (lambda d: (d / "empty").mkdir() or d / "empty", {}, r"no \*\.hdf5 files"),
        (lambda d: (d / SPATIAL).write_text("not hdf5") and d / SPATIAL, {}, "cannot open as HDF5"),
        (lambda d: _edit(write_libero_file(d / SPATIAL, {0: 6}), lambda f: f["data"].clear()), {}, "no demos"),
        (
            lambda d: write_libero_file(d / SPATIAL, {0: 6}),
            {"image_key": "agentview_image"},
            r"obs has no key 'agentview_image' \(available: agentview_rgb, ee_ori",
        ),
        (
            lambda d: _edit(
                write_libero_file(d / SPATIAL, {0: 6}, drop=("gripper_states",)),
                lambda f: f["data/demo_0"].pop("robot_states"),
            ),
            {},
            r"lacks the LIBERO state keys .* obs has \['agentview_rgb'",
        ),
        (
            lambda d: _edit(
                write_libero_file(d / SPATIAL, {0: 6}), lambda f: _replace(f, "data/demo_0/actions", np.zeros(6))
            ),
            {},
            r"actions has shape \(6,\), expected 2-d",
        ),
        (
            lambda d: _edit(
                write_libero_file(d / SPATIAL, {0: 6}),
                lambda f: _replace(f, "data/demo_0/obs/agentview_rgb", np.zeros((6, H, W, 3), np.float32)),
            ),
            {},
            r"expected \(T, H, W, 3\) uint8",
        ),
        (
            lambda d: _edit(
                write_libero_file(d / SPATIAL, {0: 6}),
                lambda f: _replace(f, "data/demo_0/obs/eye_in_hand_rgb", np.zeros((6, H, W), np.uint8)),
            ),
            {},
            r"expected \(T, H, W, 3\) uint8",
        ),
        (
            lambda d: _edit(
                write_libero_file(d / SPATIAL, {0: 6}),
                lambda f: _replace(f, "data/demo_0/obs/agentview_rgb", np.zeros((5, H, W, 3), np.uint8)),
            ),
            {},
            "has 5 frames but actions has 6",
        ),
    ],
)
def test_errors_are_one_line_dataset_errors(tmp_path: Path, make, kwargs, match):
    path = make(tmp_path)
    with pytest.raises(DatasetError, match=match) as info:
        LiberoHDF5Source(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
