"""Per-iteration rollout statistics (the data module's last `rl.iteration.Iteration`): appended to
`<dirpath>/rollout_stats.jsonl` and printed as one line (rank 0); and every rollout validation with its episode
counts (the module's `validation_results`) and its wall-clock seconds, appended to `<dirpath>/validation.jsonl`, in
`fit` and in `validate`; and where each iteration's time went, appended to `<dirpath>/timing.jsonl` at the end of
its training epoch: the rollout (with the main process's wait for env workers, its policy time, and the workers'
summed reset time), the training steps, the validations run inside the epoch, the peak GPU memory,
and the epoch's start and end (wall clock) so that the time between two iterations (checkpointing, loader setup)
can be told apart from the next rollout. The same rates are logged as metrics by the module; these files carry the
counts a significance test needs (`python -m pi0_lightning.learning_curve`) and need no MLflow to read."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch

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
        self._epoch_start: float | None = None
        self._validation_start: float | None = None
        self._validation_seconds = 0.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.path = under_root(trainer, self.dirpath) / "rollout_stats.jsonl"
        self.validation_path = self.path.with_name("validation.jsonl")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds = time.perf_counter() - self._validation_start if self._validation_start is not None else 0.0
        self._validation_start = None
        if not trainer.sanity_checking:
            self._validation_seconds += seconds
        results = getattr(pl_module, "validation_results", None)
        if not trainer.is_global_zero or trainer.sanity_checking or results is None:
            return
        self.validation_path.parent.mkdir(parents=True, exist_ok=True)
        with self.validation_path.open("a") as f:
            f.write(json.dumps({**results, "seconds": round(seconds, 3)}) + "\n")
        pl_module.validation_results = None
        rates = ", ".join(f"{s['metric']} {s['successes']}/{s['episodes']}" for s in results["settings"])
        print(f"[validation after {results['iterations_trained']} iterations] {rates}")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start, self._validation_seconds = time.time(), 0.0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
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

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        iteration = getattr(trainer.datamodule, "iteration", None)
        if not trainer.is_global_zero or self._epoch_start is None:
            return
        end = time.time()
        record = {
            "iteration": trainer.current_epoch,
            "started": round(self._epoch_start, 3),
            "ended": round(end, 3),
            **{
                name: round(iteration.metrics[key], 3) if iteration is not None and key in iteration.metrics else None
                for name, key in (
                    ("rollout_seconds", "rollout/seconds"),
                    ("env_wait_seconds", "rollout/env_seconds"),
                    ("policy_seconds", "rollout/policy_seconds"),
                    ("reset_worker_seconds", "rollout/reset_worker_seconds"),
                )
            },
            "train_seconds": round(end - self._epoch_start - self._validation_seconds, 3),
            "validation_seconds": round(self._validation_seconds, 3),
            "gpu_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None,
        }
        with self.path.with_name("timing.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
