"""Export the trained policy at the end of fit as a pi0_lightning checkpoint directory (safetensors, LoRA merged),
loadable by `PI0.from_pretrained` and convertible with `pi0-convert export-lerobot`."""

from __future__ import annotations

from pathlib import Path

import lightning as L


class SafetensorsExport(L.Callback):
    def __init__(self, dirpath: str = "runs/export"):
        """
        Args:
            dirpath: output directory (replaced atomically at each export).
        """
        self.dirpath = Path(dirpath)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with pl_module.full_parameters():  # FSDP: every rank gathers, rank 0 writes
            if trainer.is_global_zero:
                out = pl_module.export_pretrained(self.dirpath)
                print(f"policy exported to {out.resolve()} (python -m pi0_lightning.evaluate --checkpoint DIR)")
        trainer.strategy.barrier("safetensors_export")
