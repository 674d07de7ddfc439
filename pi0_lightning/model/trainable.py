"""Which parameters train: the trainable modes of RL and fine-tuning, applied to a built PI0 / PI0-FAST.

- full: everything.
- frozen_vision: everything but the SigLIP tower.
- action_expert (PI0 / PI0.5): the action expert's layers and final norm, plus the heads that talk to the action
  space (projections, time MLPs, condition embedding); PaliGemma and SigLIP stay frozen.
- lora: LoRA adapters on the Gemma projections (`model/lora.py`) plus those heads; the base weights stay frozen.
"""

from __future__ import annotations

from typing import Literal

from pi0_lightning.model.lora import apply_lora
from pi0_lightning.model.pi0 import PI0
from pi0_lightning.model.pi0_fast import PI0FAST

TrainableMode = Literal["full", "action_expert", "frozen_vision", "lora"]


def set_trainable(model: PI0 | PI0FAST, mode: TrainableMode, lora_rank: int = 16, lora_alpha: float = 16.0) -> None:
    """Set `requires_grad` for `mode` (and add LoRA adapters for mode lora)."""
    if mode == "action_expert" and isinstance(model, PI0FAST):
        raise ValueError("PI0-FAST has no action expert; use trainable full, frozen_vision or lora")
    if mode == "lora":
        model.requires_grad_(False)
        apply_lora(model.llm, lora_rank, lora_alpha)
    elif mode in ("action_expert", "frozen_vision"):
        model.requires_grad_(True)
        model.vision.requires_grad_(False)
        if mode == "action_expert":
            model.llm.requires_grad_(False)
            for layer in model.llm.layers:
                layer.experts[1].requires_grad_(True)
            model.llm.norms[1].requires_grad_(True)
    elif mode != "full":
        raise ValueError(f"trainable must be full, action_expert, frozen_vision or lora, got {mode!r}")
    if mode != "full":  # the heads that talk to the action space always train
        for name, module in model.named_children():
            if name not in ("vision", "llm"):
                module.requires_grad_(True)
