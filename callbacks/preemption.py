"""Preemption: SIGUSR1 (SLURM's warning before the time limit, `#SBATCH --signal=SIGUSR1@300`) or SIGTERM stops the
run within one environment step or training batch; on SIGUSR1 under SLURM rank 0 also requeues the job
(`scontrol requeue`), and the requeued job resumes from the newest checkpoint with `--ckpt_path last`.

The unit of resumption is the RL iteration: checkpoints are written at the end of every iteration (or every N), and
this callback marks them as resume points. Nothing is written at the signal itself: a mid-iteration checkpoint would
hold weights trained on rollouts that are not in any checkpoint, and Lightning would resume it by collecting new
rollouts and training only the remaining batches. The newest iteration checkpoint is already the exact state to go
on from, so stopping at once loses at most the unfinished iteration. `pi0-lightning` installs this callback itself
and turns Lightning's own SLURM requeue (which saves such a mid-iteration checkpoint) off.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import lightning as L

from pi0_lightning import signals
from pi0_lightning.lit.checkpoints import RESUME_KEY

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def slurm_job_id() -> str | None:
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID")
    return job if job and re.fullmatch(r"[0-9_]+", job) else None


class Preemption(L.Callback):
    def __init__(self, requeue: bool = True):
        """
        Args:
            requeue: on SIGUSR1 inside a SLURM job, requeue it (`scontrol requeue $SLURM_JOB_ID`) from rank 0.
        """
        self.requeue = requeue
        self._previous: dict[int, object] = {}
        self._iteration_end = False
        self._rank_zero = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for logger in trainer.loggers:  # metrics of an iteration reach MLflow with its checkpoint (lit/logger.py)
            if hasattr(logger, "hold_until_checkpoint"):
                logger.hold_until_checkpoint = bool(trainer.checkpoint_callbacks)
        signals.clear()
        self._rank_zero = trainer.is_global_zero
        try:
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals cannot be caught here
            self._previous.clear()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        first = signals.stop_requested() is None
        signals.request_stop(signum)
        if not first:
            return
        name = signal.Signals(signum).name
        print(f"pi0-lightning: {name} received, stopping at the next environment step or batch", file=sys.stderr)
        job = slurm_job_id()
        if signum == signal.SIGUSR1 and self.requeue and job and self._rank_zero:
            result = subprocess.call(["scontrol", "requeue", job])
            print(f"pi0-lightning: scontrol requeue {job} -> exit code {result}", file=sys.stderr)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._iteration_end = False
        for logger in trainer.loggers:
            if hasattr(logger, "iteration_started"):
                logger.iteration_started()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        signals.check()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # runs before ModelCheckpoint's hook (Lightning orders checkpoint callbacks last)
        self._iteration_end = True

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[RESUME_KEY] = {"iteration_end": self._iteration_end}
