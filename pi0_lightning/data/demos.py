"""Demonstrations -> supervised training samples, the way openpi's LIBERO fine-tuning builds them.

One sample per step t of every selected episode: the step's two camera frames (upright, resized with padding to the
model's image size, augmented in training as openpi: `data/augment.py`), the raw state s_t, the prompt (the
episode's task), and the action chunk a_t .. a_{t+H-1} in model space (openpi's `pi0_libero` delta transform
a[:6] -= s_t[:6] where the checkpoint uses it, then normalised and zero-padded to the model's action dims, exactly as
the policy's `LiberoTransforms.actions_to_model`).

Episode ends follow openpi (its LeRobot loader clamps a chunk's frame indices to the episode and openpi ignores
LeRobot's padding flags): a chunk that runs past the last step repeats the last action. `mask_padded_actions` masks
those rows out of the loss instead.

Few-shot selection (`select_episodes`): per task, a seeded permutation of its episodes; the first
`val_episodes_per_task` are held out for a validation loss, the next `episodes_per_task` train.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from pi0_lightning.data.augment import AugmentConfig, augment_image
from pi0_lightning.data.samples import TrainSample
from pi0_lightning.data.source import DatasetError, DemoSource, KeyMap
from pi0_lightning.policy.pi0_libero import LiberoInputs, PolicyInput
from pi0_lightning.policy.transforms import resize_with_pad

LOADER_CONTEXT = "forkserver"
"""How DataLoader workers start. Not by forking the training process: a video decoder that ran there (validation
without workers, a benchmark) leaves thread pools behind that a forked child deadlocks on (measured: PyAV / dav1d)."""


@dataclass
class DemoDataConfig:
    path: str = ""
    """The dataset: a LeRobot dataset root (with meta/info.json), or LIBERO HDF5 demonstrations (a .hdf5 file or a
    directory of them)."""
    format: Literal["auto", "lerobot", "hdf5"] = "auto"
    """auto: LeRobot if <path>/meta/info.json exists, else HDF5."""
    keys: KeyMap = field(default_factory=KeyMap)
    """LeRobot feature names of the two cameras, the state and the actions (openpi's LIBERO layout by default)."""
    episodes_per_task: int | None = None
    """Few-shot: train on this many episodes of each task (seeded choice); None = all of them."""
    val_episodes_per_task: int = 0
    """Episodes of each task held out for the validation loss (0 = no validation loss)."""
    seed: int = 0
    """Seed of the few-shot choice."""
    norm_stats: str | None = None
    """norm_stats.json of the dataset (default: <path>/norm_stats.json, written by
    `python -m pi0_lightning.data.norm_stats`); used unless the model checkpoint bundles its own."""
    rotate_180: bool = False
    """LeRobot datasets recorded from raw LIBERO renders (upside down): rotate frames on read. openpi's converted
    LIBERO data is upright (False); LIBERO's HDF5 files are rotated by the reader itself."""
    mask_padded_actions: bool = False
    """Mask chunk rows past the episode's end out of the loss (openpi trains on them, repeating the last action)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """openpi's training image augmentation (crop and rotation for non-wrist cameras, colour jitter for all)."""


def open_source(cfg: DemoDataConfig) -> DemoSource:
    path = Path(cfg.path)
    if not cfg.path or not path.exists():
        raise DatasetError(f"dataset {cfg.path!r} does not exist")
    fmt = cfg.format
    if fmt == "auto":
        fmt = "lerobot" if (path / "meta" / "info.json").is_file() else "hdf5"
        if fmt == "hdf5" and path.is_dir() and not any(path.glob("*.hdf5")):
            raise DatasetError(
                f"{path} is neither a LeRobot dataset (no meta/info.json) nor LIBERO HDF5 demonstrations (no .hdf5)"
            )
    if fmt == "lerobot":
        from pi0_lightning.data.lerobot import LeRobotSource

        return LeRobotSource(path, cfg.keys, rotate_180=cfg.rotate_180)
    from pi0_lightning.data.hdf5 import LiberoHDF5Source

    return LiberoHDF5Source(path)


def select_episodes(
    source: DemoSource, per_task: int | None, val_per_task: int = 0, seed: int = 0
) -> tuple[list[int], list[int]]:
    """(train, validation) episode positions: per task a seeded permutation, validation first."""
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, ep in enumerate(source.episodes):
        by_task[ep.task].append(i)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for task in sorted(by_task):
        order = [by_task[task][j] for j in rng.permutation(len(by_task[task]))]
        val += order[:val_per_task]
        rest = order[val_per_task:]
        train += rest if per_task is None else rest[:per_task]
    if not train:
        raise DatasetError(
            f"no training episodes selected ({len(source.episodes)} episodes, {len(by_task)} tasks, "
            f"{val_per_task} held out per task)"
        )
    return sorted(train), sorted(val)


class DemoDataset(Dataset):
    """Supervised samples of `episodes` (positions in `source.episodes`); `inputs` is the policy's model-free input
    half (`LiberoInputs.inputs_only()`: transforms, prompt tokenizer)."""

    def __init__(
        self,
        source: DemoSource,
        episodes: list[int],
        inputs: LiberoInputs,
        horizon: int,
        augment: AugmentConfig | None = None,
        mask_padded_actions: bool = False,
        task_ids: dict[str, int] | None = None,
    ):
        self.source = source
        self.inputs = inputs
        self.horizon = horizon
        self.augment = augment
        self.mask_padded_actions = mask_padded_actions
        tasks = sorted({source.episodes[e].task for e in episodes})
        self.task_ids = task_ids or {t: i for i, t in enumerate(tasks)}
        self.index = np.array([(e, t) for e in episodes for t in range(source.episodes[e].length)], dtype=np.int64)
        self._columns: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.index)

    def columns(self, episode: int) -> tuple[np.ndarray, np.ndarray]:
        if episode not in self._columns:
            self._columns[episode] = self.source.columns(episode)
        return self._columns[episode]

    def __getitem__(self, i: int) -> TrainSample:
        episode, t = (int(x) for x in self.index[i])
        state, actions = self.columns(episode)
        length = len(actions)
        rows = np.arange(t, t + self.horizon)
        chunk = actions[np.minimum(rows, length - 1)]
        raw_state = state[t].astype(np.float32)
        size = self.inputs.transforms.image_size
        images = [resize_with_pad(img, size, size) for img in self.source.frame_images(episode, t)]
        if self.augment is not None and self.augment.enabled:
            # worker processes get distinct torch seeds per epoch (DataLoader), so augmentations differ per epoch
            rng = np.random.default_rng([torch.initial_seed() % 2**63, i])
            images = [augment_image(img, rng, wrist=k == 1, config=self.augment) for k, img in enumerate(images)]
        task = self.source.episodes[episode].task
        tokens, token_mask = self.inputs.prompt_tokens(task, raw_state)
        model_actions = self.inputs.transforms.actions_to_model(chunk[None], raw_state[None])[0]
        mask = rows < length if self.mask_padded_actions else np.ones(self.horizon, dtype=bool)
        return TrainSample(
            inputs=PolicyInput(images[0], images[1], raw_state, tokens, token_mask),
            actions=model_actions.astype(np.float32),
            action_mask=mask,
            advantage=1.0,
            task_id=self.task_ids.get(task, -1),
        )


def supervised_collate(samples: list[TrainSample], inputs: LiberoInputs) -> dict:
    """A training batch: the model's inputs for the demonstrated chunks (`LiberoInputs.supervised_observation`)."""
    chunks = np.stack([s.actions for s in samples])
    return {
        "obs": inputs.supervised_observation([s.inputs for s in samples], chunks),
        "actions": torch.from_numpy(chunks),
        "action_mask": torch.from_numpy(np.stack([s.action_mask for s in samples])),
        "advantages": torch.ones(len(samples)),
        "valid": torch.ones(len(samples), dtype=torch.bool),
        "task_ids": torch.tensor([s.task_id for s in samples]),
    }
