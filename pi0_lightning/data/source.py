"""Demonstration datasets as supervised fine-tuning reads them: episodes of two camera frames, a state and an action
per step, and a task string as the prompt.

A source reads one on-disk format (`data/lerobot.py`: LeRobot v2.1 and v3.0; `data/hdf5.py`: LIBERO's robomimic
HDF5) and maps its keys onto ours (`KeyMap`, openpi's "repack"). Image orientation has one rule: **a source returns
images upright**, the way openpi's LIBERO training data stores them. LIBERO renders upside down (openpi rotates them
180 degrees before the model sees them, as our env policies do), so a source of raw LIBERO frames (LIBERO's own
HDF5 demonstrations) rotates them on read; LeRobot datasets converted by openpi are upright already. A source is
opened lazily in each DataLoader worker (it pickles as its arguments).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class DatasetError(Exception):
    """A dataset that cannot be read as asked (missing metadata or key, wrong shapes, nothing selected); one line."""


@dataclass
class KeyMap:
    """Which dataset keys hold our fields. Defaults: openpi's LeRobot LIBERO layout (`physical-intelligence/libero`)."""

    image: str = "image"
    """Third-person camera (HWC uint8 frames), fed to the model as base_0_rgb."""
    wrist_image: str = "wrist_image"
    """Wrist camera, fed as left_wrist_0_rgb."""
    state: str = "state"
    """Proprioceptive state per step (LIBERO: 8-d, eef position, axis-angle, gripper qpos)."""
    actions: str = "actions"
    """Action per step (LIBERO: 7-d, delta eef pose and gripper)."""


@dataclass
class EpisodeInfo:
    index: int
    """The dataset's own episode index (LeRobot `episode_index`, HDF5 demo number)."""
    length: int
    """Steps (frames) in the episode."""
    task: str
    """The task instruction, used as the prompt."""


class DemoSource(Protocol):
    episodes: list[EpisodeInfo]
    """Every episode of the dataset, in the dataset's order."""

    def columns(self, episode: int) -> tuple[np.ndarray, np.ndarray]:
        """(state (T, S), actions (T, A)) float32 of `episodes[episode]` (T = its length)."""

    def frame_images(self, episode: int, frame: int) -> tuple[np.ndarray, np.ndarray]:
        """(image, wrist_image) of one step of `episodes[episode]`: (H, W, 3) uint8, upright."""
