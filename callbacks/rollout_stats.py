"""Per-iteration rollout statistics (the data module's last `rl.iteration.Iteration`): appended to
`<dirpath>/rollout_stats.jsonl` and printed as one line (rank 0); and every rollout validation with its episode
counts (the module's `validation_results`), appended to `<dirpath>/validation.jsonl`, in `fit` and in `validate`.
The same rates are logged as metrics by the module; these files carry the counts a significance test needs
(`python -m pi0_lightning.learning_curve`) and need no MLflow to read."""

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
        self.validation_path: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.path = under_root(trainer, self.dirpath) / "rollout_stats.jsonl"
        self.validation_path = self.path.with_name("validation.jsonl")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        results = getattr(pl_module, "validation_results", None)
        if not trainer.is_global_zero or trainer.sanity_checking or results is None:
            return
        self.validation_path.parent.mkdir(parents=True, exist_ok=True)
        with self.validation_path.open("a") as f:
            f.write(json.dumps(results) + "\n")
        pl_module.validation_results = None
        rates = ", ".join(f"{s['metric']} {s['successes']}/{s['episodes']}" for s in results["settings"])
        print(f"[validation after {results['iterations_trained']} iterations] {rates}")

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
