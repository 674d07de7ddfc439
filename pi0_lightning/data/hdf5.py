"""LIBERO's original demonstrations (robomimic HDF5, one file per task) as a :class:`DemoSource`.

Layout, as LIBERO's ``scripts/create_dataset.py`` writes it (files ``<suite>/<task name>_demo.hdf5``)::

    data                       attrs: problem_info (JSON: problem_name, domain_name, language_instruction),
                                      env_name, env_args, bddl_file_name, bddl_file_content,
                                      macros_image_convention, num_demos, total
    data/demo_<i>              attrs: num_samples, model_file, init_state
    data/demo_<i>/actions      (T, 7) float64: delta eef position (3), delta axis-angle (3), gripper (-1 open, +1 close)
    data/demo_<i>/obs/
        agentview_rgb          (T, 128, 128, 3) uint8, robosuite ``agentview_image``
        eye_in_hand_rgb        (T, 128, 128, 3) uint8, robosuite ``robot0_eye_in_hand_image``
        ee_states              (T, 6) = robot0_eef_pos (3) + quat2axisangle(robot0_eef_quat) (3)
        ee_pos, ee_ori         (T, 3) each: the two halves of ee_states (ee_ori is axis-angle, not a quaternion)
        gripper_states         (T, 2) robot0_gripper_qpos
        joint_states           (T, 7) robot0_joint_pos
    data/demo_<i>/robot_states (T, 9) = gripper qpos (2) + eef pos (3) + eef quaternion xyzw (4)

State ``"libero"`` is openpi's 8-d LIBERO state, eef position + axis-angle + gripper qpos (``libero_state``). It is
read from ``ee_states`` + ``gripper_states`` (what OpenVLA's LIBERO RLDS builder, the origin of openpi's LIBERO
data, read), else ``ee_pos`` + ``ee_ori`` + ``gripper_states`` (``ee_ori`` converted with ``quat2axisangle`` if a
file stores a 4-d quaternion there), else ``robot_states``.

Task: LIBERO's benchmark derives each task's instruction from its name (``grab_language_from_filename``: drop the
scene prefix such as ``KITCHEN_SCENE3_`` of libero_10 / libero_90, underscores -> spaces), and OpenVLA's RLDS builder
derives it the same way from the ``<name>_demo.hdf5`` file name; that lowercase string is the prompt openpi trained
on and the one LIBERO serves at evaluation (RIPT-VLA uses it too). So the task is taken from the file name; only a file
not named ``*_demo.hdf5`` falls back to ``problem_info["language_instruction"]`` (the BDDL ``:language`` text, which
is capitalised, e.g. "Pick up the ...").

Orientation: a source returns frames upright, as openpi's LIBERO training data holds them. That data (OpenVLA's
``modified_libero_rlds``) stores every LIBERO frame rotated by 180 degrees (``img[::-1, ::-1]``), and openpi's LIBERO
client rotates the simulator's renders by 180 degrees "to match train preprocessing". LIBERO's HDF5 frames are raw
renders in robosuite's ``opengl`` convention (the default, recorded in the ``macros_image_convention`` attribute),
so they are rotated by 180 degrees on read. A file made with ``macros_image_convention = "opencv"`` holds the
renders flipped vertically already (robosuite: ``image[::-1]``), so only a horizontal flip remains; any other value
is rejected.

Demos are ordered as robomimic orders them: file order, then demo number numerically (``demo_10`` after ``demo_9``).
Files are opened lazily, once per process (h5py handles do not survive pickling or fork): the source pickles as its
arguments and episode table.

Deliberate simplifications: nothing is resized (LIBERO renders at 128x128; openpi's data was re-rendered at 256x256,
and the consumer resizes to the model's 224), and LIBERO's no-op actions are kept (OpenVLA filtered them when it
regenerated the data openpi trained on).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pi0_lightning.data.source import DatasetError, EpisodeInfo
from pi0_lightning.policy.transforms import libero_state, quat2axisangle

_DEMO_RE = re.compile(r"^demo_(\d+)$")
_DEMO_SUFFIX = "_demo.hdf5"
# How to turn a stored frame into an upright one, per robosuite image convention (see the module docstring).
_UPRIGHT = {
    "opengl": (slice(None, None, -1), slice(None, None, -1)),
    "opencv": (slice(None), slice(None, None, -1)),
}


def task_from_filename(name: str) -> str | None:
    """LIBERO's task instruction from a ``<task>_demo.hdf5`` file name, or None for another name.

    ``KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5`` -> ``"turn on the stove"``: the words after the last one holding
    ``SCENE`` (libero_10 / libero_90 scene prefixes), as LIBERO's ``grab_language_from_filename`` and OpenVLA's RLDS
    builder do.
    """
    if not name.endswith(_DEMO_SUFFIX):
        return None
    words = name[: -len(_DEMO_SUFFIX)].split("_")
    scene = [i for i, w in enumerate(words) if "SCENE" in w]
    if scene:
        words = words[scene[-1] + 1 :]
    task = " ".join(w for w in words if w)
    return task or None


def _attr_str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _attr_str(value.item())
    return str(value)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _resolve_paths(paths: str | Path | list[str | Path] | tuple[str | Path, ...]) -> list[Path]:
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    if not items:
        raise DatasetError("LiberoHDF5Source: no paths given")
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.glob("*.hdf5") if q.is_file())
            if not found:
                raise DatasetError(f"{p}: directory holds no *.hdf5 files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DatasetError(f"{p}: no such file or directory")
    return files


@dataclass(frozen=True)
class _Episode:
    file: int
    """Index into the source's file list."""
    demo: str
    """Group name under ``data``, e.g. ``demo_10``."""


class LiberoHDF5Source:
    """LIBERO's robomimic HDF5 demonstrations: every demo of every file, in file order then demo number.

    ``paths``: one file, a directory (its ``*.hdf5`` files, sorted by name, not recursive) or a list of either.
    ``image_key`` / ``wrist_key``: obs datasets of the third-person and wrist cameras.
    ``state``: ``"libero"`` (openpi's 8-d state, see the module docstring) or comma-separated obs keys whose
    columns are concatenated in that order (a 1-d key gives one column).
    """

    def __init__(
        self,
        paths: str | Path | list[str | Path],
        image_key: str = "agentview_rgb",
        wrist_key: str = "eye_in_hand_rgb",
        state: str = "libero",
    ) -> None:
        self.files = _resolve_paths(paths)
        self.image_key = image_key
        self.wrist_key = wrist_key
        self.state = state
        self._state_keys = None if state == "libero" else [k.strip() for k in state.split(",") if k.strip()]
        if self._state_keys is not None and not self._state_keys:
            raise DatasetError(f"state must be 'libero' or comma-separated obs keys, got {state!r}")
        self.episodes: list[EpisodeInfo] = []
        self._refs: list[_Episode] = []
        self._upright: list[tuple[slice, slice]] = []
        self._state_plan: list[str] = []  # per file: ee_states, ee_pos, robot_states or keys (see _state_sources)
        self._handles: dict[int, h5py.File] = {}
        self._pid = os.getpid()
        self._dims: tuple[int, int] | None = None  # (state, action) width, equal for every episode
        for i, path in enumerate(self.files):
            self._scan(i, path)

    # -- pickling: arguments and episode table, never h5py handles ------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def close(self) -> None:
        """Close this process's open files (they reopen on the next read)."""
        for f in self._handles.values():
            f.close()
        self._handles = {}

    def _file(self, i: int) -> h5py.File:
        if self._pid != os.getpid():
            # A forked worker inherits the parent's handles; they are not safe to share, so start afresh.
            self._handles = {}
            self._pid = os.getpid()
        f = self._handles.get(i)
        if f is None:
            try:
                f = h5py.File(self.files[i], "r")
            except OSError as e:
                raise DatasetError(f"{self.files[i]}: cannot open as HDF5 ({_one_line(e)})") from e
            self._handles[i] = f
        return f

    # -- scanning -------------------------------------------------------------------------------------------

    def _scan(self, i: int, path: Path) -> None:
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise DatasetError(f"{path}: cannot open as HDF5 ({_one_line(e)})") from e
        with f:
            data = f.get("data")
            if not isinstance(data, h5py.Group):
                raise DatasetError(f"{path}: no 'data' group (not a robomimic / LIBERO demo file)")
            demos = sorted(
                ((int(m.group(1)), name) for name in data if (m := _DEMO_RE.match(name))),
            )
            if not demos:
                raise DatasetError(f"{path}: no demos (no data/demo_<i> groups; data has {sorted(data)[:10]})")
            task = self._task(path, data)
            self._upright.append(self._orientation(path, data))
            self._state_plan.append(self._plan_state(path, data[demos[0][1]]))
            for number, name in demos:
                length = self._check_demo(path, data[name], name, i)
                self.episodes.append(EpisodeInfo(index=number, length=length, task=task))
                self._refs.append(_Episode(file=i, demo=name))

    @staticmethod
    def _task(path: Path, data: h5py.Group) -> str:
        task = task_from_filename(path.name)
        if task is not None:
            return task
        raw = data.attrs.get("problem_info")
        if raw is not None:
            try:
                info = json.loads(_attr_str(raw))
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}: data attribute problem_info is not JSON ({_one_line(e)})") from e
            text = info.get("language_instruction") if isinstance(info, dict) else None
            if isinstance(text, list):  # LIBERO's reader joins it, so tolerate a token list
                text = " ".join(str(t) for t in text)
            if isinstance(text, str) and text.strip().strip('"').strip():
                return text.strip().strip('"').strip()
        raise DatasetError(
            f"{path}: no task instruction (the name does not end in {_DEMO_SUFFIX} and "
            "data has no problem_info.language_instruction)"
        )

    @staticmethod
    def _orientation(path: Path, data: h5py.Group) -> tuple[slice, slice]:
        convention = _attr_str(data.attrs.get("macros_image_convention", "opengl")).strip().lower()
        if convention not in _UPRIGHT:
            raise DatasetError(
                f"{path}: unknown macros_image_convention {convention!r} (expected one of {sorted(_UPRIGHT)})"
            )
        return _UPRIGHT[convention]

    def _plan_state(self, path: Path, demo: h5py.Group) -> str:
        if self._state_keys is not None:
            return "keys"
        obs = demo.get("obs")
        keys = set(obs) if isinstance(obs, h5py.Group) else set()
        if {"ee_states", "gripper_states"} <= keys:
            return "ee_states"
        if {"ee_pos", "ee_ori", "gripper_states"} <= keys:
            return "ee_pos"
        if "robot_states" in demo:
            return "robot_states"
        where = f"{path}: {demo.name.lstrip('/')}"
        raise DatasetError(
            f"{where}/obs lacks the LIBERO state keys (need ee_states + gripper_states, "
            f"ee_pos + ee_ori + gripper_states, or robot_states beside obs); obs has {sorted(keys)}"
        )

    def _state_sources(self, i: int) -> list[tuple[str, int | tuple[int, ...]]]:
        """(path relative to the demo group, allowed widths) of the state's datasets in file ``i``."""
        plan = self._state_plan[i]
        if plan == "ee_states":
            return [("obs/ee_states", 6), ("obs/gripper_states", 2)]
        if plan == "ee_pos":
            return [("obs/ee_pos", 3), ("obs/ee_ori", (3, 4)), ("obs/gripper_states", 2)]
        if plan == "robot_states":
            return [("robot_states", 9)]
        return [(f"obs/{k}", ()) for k in self._state_keys or []]

    def _check_demo(self, path: Path, demo: h5py.Group, name: str, i: int) -> int:
        where = f"{path}: data/{name}"
        actions = demo.get("actions")
        if not isinstance(actions, h5py.Dataset):
            raise DatasetError(f"{where} has no 'actions' dataset (has {sorted(demo)})")
        if actions.ndim != 2 or actions.shape[1] < 1:
            raise DatasetError(f"{where}/actions has shape {actions.shape}, expected 2-d (T, A) (LIBERO: (T, 7))")
        length = int(actions.shape[0])
        if length == 0:
            raise DatasetError(f"{where} has no steps (actions shape {actions.shape})")
        obs = demo.get("obs")
        if not isinstance(obs, h5py.Group):
            raise DatasetError(f"{where} has no 'obs' group (has {sorted(demo)})")

        def dataset(rel: str) -> h5py.Dataset:
            ds = demo.get(rel)
            if not isinstance(ds, h5py.Dataset):
                if rel.startswith("obs/"):
                    raise DatasetError(f"{where}/obs has no key {rel[4:]!r} (available: {', '.join(sorted(obs))})")
                raise DatasetError(f"{where} has no key {rel!r} (available: {', '.join(sorted(demo))})")
            frames = ds.shape[0] if ds.ndim else "no"
            if frames != length:
                raise DatasetError(f"{where}/{rel} has {frames} frames but actions has {length}")
            return ds

        for key in (self.image_key, self.wrist_key):
            ds = dataset(f"obs/{key}")
            if ds.ndim != 4 or ds.shape[-1] != 3 or ds.dtype != np.uint8:
                raise DatasetError(f"{where}/obs/{key} is {ds.dtype} {ds.shape}, expected (T, H, W, 3) uint8 images")
        width = 0
        for rel, allowed in self._state_sources(i):
            ds = dataset(rel)
            if ds.ndim not in (1, 2) or not np.issubdtype(ds.dtype, np.number):
                raise DatasetError(f"{where}/{rel} is {ds.dtype} {ds.shape}, expected numeric (T,) or (T, D)")
            w = 1 if ds.ndim == 1 else int(ds.shape[1])
            if allowed and w not in (allowed if isinstance(allowed, tuple) else (allowed,)):
                raise DatasetError(f"{where}/{rel} has shape {ds.shape}, expected (T, {allowed})")
            width += w
        if self._state_keys is None:
            width = 8  # the LIBERO state, whichever keys hold it
        dims = (width, int(actions.shape[1]))
        if self._dims is None:
            self._dims = dims
        elif dims != self._dims:
            raise DatasetError(f"{where}: state / action widths {dims} differ from earlier episodes' {self._dims}")
        return length

    # -- DemoSource -----------------------------------------------------------------------------------------

    def episode_source(self, episode: int) -> tuple[Path, str]:
        """(file, demo group name) of ``episodes[episode]``."""
        ref = self._refs[episode]
        return self.files[ref.file], ref.demo

    def _demo(self, episode: int) -> tuple[h5py.Group, _Episode]:
        ref = self._refs[episode]
        return self._file(ref.file)["data"][ref.demo], ref

    def columns(self, episode: int) -> tuple[np.ndarray, np.ndarray]:
        """(state (T, S), actions (T, A)) float32; the state is built in float64 and rounded once."""
        demo, ref = self._demo(episode)
        actions = np.asarray(demo["actions"][()], dtype=np.float32)
        parts = [np.asarray(demo[rel][()], dtype=np.float64) for rel, _ in self._state_sources(ref.file)]
        plan = self._state_plan[ref.file]
        if plan == "robot_states":
            rs = parts[0]
            state = np.stack([libero_state(r[2:5], r[5:9], r[0:2]) for r in rs])
        else:
            if plan == "ee_pos" and parts[1].shape[1] == 4:
                parts[1] = np.stack([quat2axisangle(q) for q in parts[1]])
            state = np.concatenate([p.reshape(len(p), -1) for p in parts], axis=1).astype(np.float32)
        return state, actions

    def frame_images(self, episode: int, frame: int) -> tuple[np.ndarray, np.ndarray]:
        """(image, wrist_image) of one step, (H, W, 3) uint8, upright (see the module docstring)."""
        info = self.episodes[episode]
        if not 0 <= frame < info.length:
            raise IndexError(f"frame {frame} out of range for episode {episode} of length {info.length}")
        demo, ref = self._demo(episode)
        rows, cols = self._upright[ref.file]
        obs = demo["obs"]
        image = np.ascontiguousarray(obs[self.image_key][frame][rows, cols])
        wrist = np.ascontiguousarray(obs[self.wrist_key][frame][rows, cols])
        return image, wrist
