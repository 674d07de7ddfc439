"""LoRA adapters for the Gemma experts' linear layers (openpi's `gemma_2b_lora` / `gemma_300m_lora` idea).

y = W x + (alpha / rank) * B A x, with A random and B zero-initialised, so the adapted model starts identical to the
base model. Only A and B train; `merge_lora` folds them back into plain Linear weights for export.
"""

from __future__ import annotations

import math

import torch
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(
            torch.empty(rank, base.in_features, dtype=base.weight.dtype, device=base.weight.device)
        )
        self.lora_b = nn.Parameter(
            torch.zeros(base.out_features, rank, dtype=base.weight.dtype, device=base.weight.device)
        )
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @property
    def weight(self) -> torch.Tensor:  # the dtype probes elsewhere read `.weight`
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        out = self.base
        with torch.no_grad():
            out.weight += (self.lora_b @ self.lora_a * self.scale).to(out.weight.dtype)
        return out


def apply_lora(
    module: nn.Module, rank: int = 16, alpha: float = 16.0, targets: tuple[str, ...] = DEFAULT_TARGETS
) -> list[str]:
    """Replace every Linear whose attribute name is in `targets` (below `module`) by a LoRALinear; returns names."""
    replaced = []
    for name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(parent, child_name, LoRALinear(child, rank, alpha))
                replaced.append(f"{name}.{child_name}" if name else child_name)
    return replaced


def merge_lora(module: nn.Module) -> int:
    """Fold all LoRA adapters into their base Linear layers in place; returns how many were merged."""
    n = 0
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, child_name, child.merged())
                n += 1
    return n
