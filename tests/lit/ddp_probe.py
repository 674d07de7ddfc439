"""A callback for the 2-process DDP test (imported by name in the spawned ranks): after every optimizer step each
rank writes a checksum of its weights, and per epoch its batch count and valid-sample count, to a JSON-lines file."""

from __future__ import annotations

import json
import os

import lightning as L
import torch


class LockstepProbe(L.Callback):
    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def _write(self, trainer: L.Trainer, record: dict) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            checksum = sum(float(p.double().sum()) for p in pl_module.model.parameters())
        self._write(trainer, {"epoch": trainer.current_epoch, "step": trainer.global_step, "checksum": checksum,
                              "valid": int(batch["valid"].sum())})  # fmt: skip

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._write(trainer, {"epoch": trainer.current_epoch, "batches": trainer.num_training_batches})
