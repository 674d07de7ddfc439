"""Lightning checkpoints a killed, preempted or disk-starved run can always resume from.

- `AtomicCheckpointIO` writes a checkpoint to a hidden temporary file beside its target, fsyncs it and renames it into
  place, so a full disk or a kill during the write leaves the previous `last.ckpt` whole (the rename is atomic on a
  POSIX file system).
- `read_checkpoint` opens a checkpoint the way resuming will (a truncated file fails here, in one line) and returns
  what the CLI needs before anything is built: the iteration, the step and the MLflow run it belongs to.
- `find_resume` turns `--ckpt_path last` into the newest complete resume point in the checkpoint directory, skipping
  broken files with a warning. A resume point is a checkpoint written at the end of an RL iteration: one written
  mid-iteration (e.g. a best-so-far checkpoint saved when validation ends) is for evaluation only, because resuming it
  would repeat the iteration's rollouts with half-trained weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from pi0_lightning.convert.io import atomic_output_file

RESUME_KEY = "pi0_lightning"
"""Checkpoint entry written by the `Preemption` callback: {"iteration_end": bool}."""


class CheckpointFileError(Exception):
    """A Lightning checkpoint that cannot be read (missing, truncated, not a checkpoint)."""


def is_iteration_end(checkpoint: dict[str, Any]) -> bool:
    """Whether a loaded checkpoint was written at the end of an RL iteration (unmarked checkpoints count as such)."""
    return bool((checkpoint.get(RESUME_KEY) or {}).get("iteration_end", True))


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file, fsync, rename: a checkpoint path always holds a complete file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if "://" in str(path):  # remote stores (s3://, gs://) have their own commit semantics
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_output_file(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)
        return None


@dataclass
class CheckpointInfo:
    path: Path
    epoch: int
    """The epoch (RL iteration index) the checkpoint was saved in."""
    global_step: int
    run_id: str | None
    """The MLflow run that wrote it (None: written without MLflow)."""
    tracking_uri: str | None
    resumable: bool
    """Written at the end of an RL iteration."""


def read_checkpoint(path: str | Path) -> CheckpointInfo:
    """Open a Lightning checkpoint (tensors memory-mapped, not read) and return its bookkeeping."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointFileError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # torch raises RuntimeError / pickle errors / OSError for damaged files
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointFileError(f"checkpoint {path} is damaged or incomplete ({cause})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "epoch" not in ckpt:
        raise CheckpointFileError(f"{path} is not a Lightning checkpoint (no state_dict / epoch)")
    mlflow = ckpt.get("mlflow") or {}
    return CheckpointInfo(
        path=path,
        epoch=int(ckpt["epoch"]),
        global_step=int(ckpt.get("global_step", 0)),
        run_id=mlflow.get("run_id"),
        tracking_uri=mlflow.get("tracking_uri"),
        resumable=is_iteration_end(ckpt),
    )


def find_resume(directory: str | Path) -> tuple[CheckpointInfo | None, list[str]]:
    """The newest complete resume point among `directory/*.ckpt` (by modification time), and one warning line per
    newer file that was skipped."""
    directory = Path(directory)
    files = (
        sorted(directory.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True) if directory.is_dir() else []
    )
    warnings = []
    for file in files:
        try:
            info = read_checkpoint(file)
        except CheckpointFileError as e:
            warnings.append(f"skipping {e}")
            continue
        if info.resumable:
            return info, warnings
    return None, warnings
