"""Stacked projections for inference: several Linear layers that read the same input run as one GEMM.

Used for the action expert's q/k/v and gate/up (installed by `speed.py`). At batch 1 these GEMMs are small, so one
launch instead of two or three saves more than the extra copy of the weights costs. (Stacking PaliGemma's or
SigLIP's projections too gained nothing measurable on an H100: BENCHMARKS.md.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pi0_lightning.model.gemma import ExpertLayer


class FusedWeight:
    """An inference-time copy of several bias-free Linear weights stacked along the output dimension, so that one
    GEMM replaces several small ones. The parameters stay separate (checkpoints, LoRA, FSDP and the optimizer see no
    change); the copy is refreshed in place whenever a source was modified (its autograd version counter moves on
    every in-place update: optimizer steps, `load_state_dict`), and rebuilt when a source was re-allocated (`.to()`),
    so it never goes stale and, while shapes hold, keeps the address a CUDA graph uses."""

    def __init__(self, linears: Sequence[nn.Linear], norm_weight: torch.Tensor | None = None):
        """`norm_weight`: the weight w of the (1 + w) RMSNorm before these layers, folded in as W * (1 + w) along
        the input dimension, for GEMMs that take the raw rows and scale each by its 1/rms afterwards
        (`small_gemm.linear`'s `rms_eps`)."""
        self.linears = list(linears)
        if any(lin.bias is not None for lin in self.linears):
            raise ValueError("FusedWeight: the layers must be bias-free")
        self.norm_weight = norm_weight
        self.sizes = [lin.out_features for lin in self.linears]
        self.weight = self._stack()
        self.stamp = self._stamp()

    def _stamp(self) -> tuple:
        tensors = [lin.weight for lin in self.linears] + [self.norm_weight] * (self.norm_weight is not None)
        return tuple((t._version, t.data_ptr(), t.dtype) for t in tensors)

    def _stack(self, out: torch.Tensor | None = None) -> torch.Tensor:
        # a normal tensor even when first built under inference_mode, so later in-place refreshes stay legal
        with torch.inference_mode(False), torch.no_grad():
            stacked = torch.cat([lin.weight for lin in self.linears], out=out)
            if self.norm_weight is not None:  # in float32, rounded once
                stacked.copy_(stacked.float() * (1.0 + self.norm_weight.float()))
        return stacked

    def refresh(self) -> None:
        stamp = self._stamp()
        if stamp == self.stamp:
            return
        same_place = all(s[1:] == t[1:] for s, t in zip(stamp, self.stamp, strict=True))
        if same_place:
            self._stack(out=self.weight)
        else:
            self.weight = self._stack()
        self.stamp = stamp  # stacking reads the sources without changing them

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.linear(x, self.weight).split(self.sizes, dim=-1)


def fusable(linears: Sequence[nn.Module]) -> bool:
    """Plain bias-free Linear layers only: LoRA-adapted ones compute more than their weight."""
    return all(type(lin) is nn.Linear and lin.bias is None for lin in linears)


class ExpertStack:
    """One expert's stacked inference weights: q/k/v and gate/up, and with `fold_norms` (plain norms only: PI0.5's
    adaptive norms change per denoising step) the same with the norms' (1 + w) folded in, for `small_gemm`."""

    def __init__(self, expert: ExpertLayer, fold_norms: bool):
        self.expert = expert
        self.fold_norms = fold_norms
        qkv, gate_up = self.sources(expert)
        self.qkv, self.gate_up = FusedWeight(qkv), FusedWeight(gate_up)
        self.folded_qkv = self.folded_gate_up = None
        if fold_norms and expert.attn_norm.dense is None and expert.ffn_norm.dense is None:
            self.folded_qkv = FusedWeight(qkv, norm_weight=expert.attn_norm.weight)
            self.folded_gate_up = FusedWeight(gate_up, norm_weight=expert.ffn_norm.weight)

    @staticmethod
    def sources(expert: ExpertLayer) -> tuple[list[nn.Module], list[nn.Module]]:
        return [expert.q_proj, expert.k_proj, expert.v_proj], [expert.mlp.gate_proj, expert.mlp.up_proj]

    @classmethod
    def build(cls, expert: ExpertLayer, fold_norms: bool) -> ExpertStack | None:
        """The stack, or None for LoRA-adapted layers (they compute more than their weight)."""
        qkv, gate_up = cls.sources(expert)
        return cls(expert, fold_norms) if fusable(qkv + gate_up) else None

    def current(self) -> ExpertStack | None:
        """This stack brought up to date with its parameters, or (a projection was replaced after stacking, e.g. by
        a LoRA adapter) a new one or None."""
        qkv, gate_up = self.sources(self.expert)
        if self.qkv.linears != qkv or self.gate_up.linears != gate_up:
            return self.build(self.expert, self.fold_norms)
        for fused in (self.qkv, self.gate_up, self.folded_qkv, self.folded_gate_up):
            if fused is not None:
                fused.refresh()
        return self

    def gemms_fusable(self) -> bool:
        """o_proj and down_proj are plain Linear layers, so `small_gemm` may run them from their weights."""
        return fusable((self.expert.o_proj, self.expert.mlp.down_proj))
