"""DemoDataModule: supervised fine-tuning data, the first stage of the SFT -> RL pipeline.

Training reads a demonstration dataset (`data/demos.py`: LeRobot v2.1 / v3.0 or LIBERO HDF5, few-shot selection,
openpi's chunks, delta actions, normalisation and augmentation) through a DataLoader with worker processes; each
worker holds the dataset's lazily opened files and the policy's model-free input half (transforms and tokenizers,
`LiberoInputs.inputs_only`), so batches arrive as model inputs. Under DDP each rank reads its own shard.

Validation can run environment rollouts, as RL does (`env` given: the official init states, `RolloutDataModule`'s
machinery), and/or the loss on held-out episodes (`dataset.val_episodes_per_task > 0`, logged as val/loss).

    pi0-lightning fit --config configs/sft/pi0_libero.yaml --data.dataset.path ~/data/libero
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from pi0_lightning.data.demos import (
    LOADER_CONTEXT,
    DemoDataConfig,
    DemoDataset,
    open_source,
    select_episodes,
    supervised_collate,
)
from pi0_lightning.data.norm_stats import default_path, demo_chunks
from pi0_lightning.envs.spec import EnvConfig
from pi0_lightning.lit.datamodule import RolloutDataModule


@dataclass
class DemoInfo:
    """What the module needs from the dataset before it builds the policy."""

    instructions: list[str]
    """Every task string (a random model's small tokenizer is trained on them)."""
    norm_stats: dict | None
    """The dataset's norm_stats.json (None: use the checkpoint's)."""
    chunks: Callable[[int, bool], np.ndarray]
    """(horizon, delta actions) -> unnormalised model-space chunks of the training episodes (a random PI0-FAST's
    FAST processor is fitted on them)."""


class DemoDataModule(RolloutDataModule):
    def __init__(
        self,
        dataset: DemoDataConfig | None = None,
        env: EnvConfig | None = None,
        batch_size: int = 32,
        num_workers: int = 2,
        replan_steps: int = 5,
        eval_tasks: str | None = None,
        eval_episodes: int = 5,
        video_episodes: int = 0,
        seed: int = 0,
        progress: bool = True,
    ):
        """
        Args:
            dataset: the demonstrations, the few-shot selection and the held-out episodes.
            env: validation rollouts in this environment (None: no rollouts, the held-out loss only).
            batch_size: samples per training batch (per rank).
            num_workers: DataLoader worker processes per rank (decoding and augmentation run there).
            replan_steps: actions executed per predicted chunk in validation rollouts (openpi LIBERO: 5).
            eval_tasks: task ids of validation rollouts (default: every task of `env`).
            eval_episodes: validation episodes per task (official init states 0..N-1).
            video_episodes: validation episodes per task recorded as video.
            seed: seed of shuffling (the few-shot choice has its own, `dataset.seed`).
            progress: show rollout progress bars.
        """
        super().__init__(
            env=env,
            replan_steps=replan_steps,
            batch_size=batch_size,
            eval_tasks=eval_tasks,
            eval_episodes=eval_episodes,
            video_episodes=video_episodes,
            seed=seed,
            progress=progress,
        )
        self.dataset = dataset or DemoDataConfig()
        self.rollouts = env is not None
        self.num_workers = num_workers
        self.source = None
        self.train_episodes: list[int] = []
        self.val_episodes: list[int] = []
        self.demos: DemoInfo | None = None

    def setup(self, stage: str) -> None:
        if self.source is None:
            cfg = self.dataset
            self.source = open_source(cfg)
            self.train_episodes, self.val_episodes = select_episodes(
                self.source, cfg.episodes_per_task, cfg.val_episodes_per_task, cfg.seed
            )
            stats_file = Path(cfg.norm_stats) if cfg.norm_stats else default_path(cfg.path)
            stats = json.loads(stats_file.read_text()) if stats_file.is_file() else None
            tasks = sorted({ep.task for ep in self.source.episodes})
            chunks = partial(demo_chunks, self.source, self.train_episodes)
            self.demos = DemoInfo(instructions=tasks, norm_stats=stats, chunks=chunks)
        if self.rollouts:
            super().setup(stage)

    def _dataset(self, episodes: list[int], train: bool) -> tuple[DemoDataset, partial]:
        module = self.trainer.lightning_module
        inputs = module.policy().inputs_only()
        tasks = {t: i for i, t in enumerate(self.demos.instructions)}
        ds = DemoDataset(
            self.source,
            episodes,
            inputs,
            module.model.config.action_horizon,
            augment=self.dataset.augment if train else None,
            mask_padded_actions=self.dataset.mask_padded_actions,
            task_ids=tasks,
        )
        return ds, partial(supervised_collate, inputs=inputs)

    def _loader(self, episodes: list[int], train: bool) -> DataLoader:
        ds, collate = self._dataset(episodes, train)
        epoch = self.trainer.current_epoch
        sampler = None
        if self.world_size > 1:
            sampler = DistributedSampler(ds, self.world_size, self.rank, shuffle=train, seed=self.seed, drop_last=train)
            sampler.set_epoch(epoch)
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train,
            num_workers=self.num_workers,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch),
            multiprocessing_context=LOADER_CONTEXT if self.num_workers else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_episodes, train=True)

    def val_dataloader(self) -> list[DataLoader]:
        loaders = [super().val_dataloader()] if self.rollouts else []
        if self.val_episodes:
            loaders.append(self._loader(self.val_episodes, train=False))
        return loaders
