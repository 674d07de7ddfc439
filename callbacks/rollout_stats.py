"""Per-iteration rollout statistics (the data module's last `rl.iteration.Iteration`): appended to
`<dirpath>/rollout_stats.jsonl` and printed as one line (rank 0). The same numbers are logged as metrics by the
module; this file is for quick inspection without MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L

from pi0_lightning.callbacks.paths import under_root


class RolloutStatsWriter(L.Callback):
    def __init__(self, dirpath: str | None = None):
        """
        Args:
            dirpath: directory of rollout_stats.jsonl (default: the trainer's root directory).
        """
        self.dirpath = dirpath
        self.path: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.path = under_root(trainer, self.dirpath) / "rollout_stats.jsonl"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        iteration = getattr(trainer.datamodule, "iteration", None)
        if not trainer.is_global_zero or iteration is None:
            return
        stats = iteration.metrics
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"iteration": trainer.current_epoch, **stats}) + "\n")
        s = stats
        print(
            f"[iteration {trainer.current_epoch}] rollout success {s['rollout/success_rate']:.3f}, "
            f"useful groups {s['rollout/useful_group_frac']:.2f}, train chunks {s['rollout/train_chunks']:.0f}, "
            f"env {s['rollout/env_steps_per_s']:.1f} steps/s, policy {s['rollout/policy_ms_per_call']:.0f} ms/call, "
            f"rollout {s['rollout/seconds']:.1f} s"
        )
