"""Export the trained policy at the end of fit as a pi0_lightning checkpoint directory (safetensors, LoRA merged),
loadable by `PI0.from_pretrained` and convertible with `pi0-convert export-lerobot`."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from pi0_lightning.callbacks.paths import under_root


class SafetensorsExport(L.Callback):
    """At the end of fit, writes the policy as a pi0_lightning checkpoint directory (float32 safetensors, LoRA merged,
    norm stats and tokenizer bundled).

    What loads it: `PI0.from_pretrained(DIR)` (or `load_pretrained`) and `python -m pi0_lightning.evaluate
    --checkpoint DIR` read the directory as it is, CFG condition embedding included (any guidance w, `--guidance`);
    `pi0-convert export-lerobot DIR OUT` turns it into a LeRobot checkpoint, with a CFG condition folded in as
    guidance w = 1 (LeRobot's PI0 has no condition embedding, so w > 1 is lost there).
    """

    def __init__(self, dirpath: str | None = None):
        """
        Args:
            dirpath: output directory, replaced atomically at each export (default: <root dir>/export).
        """
        self.given = dirpath
        self.dirpath = Path(dirpath) if dirpath else None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.dirpath = under_root(trainer, self.given, "export")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from pi0_lightning.lit.strategies import full_parameters

        with full_parameters(trainer):  # FSDP: every rank gathers, rank 0 writes
            if trainer.is_global_zero:
                out = pl_module.export_pretrained(self.dirpath)
                print(f"policy exported to {out.resolve()} (python -m pi0_lightning.evaluate --checkpoint DIR)")
        trainer.strategy.barrier("safetensors_export")
