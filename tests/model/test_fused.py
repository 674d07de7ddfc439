"""FusedWeight: stacked copies of Linear weights (optionally with an RMSNorm's (1 + w) folded in) that follow their
parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pi0_lightning.model.fused import FusedWeight, fusable


def _linears() -> list[nn.Linear]:
    torch.manual_seed(0)
    return [nn.Linear(8, n, bias=False) for n in (4, 6, 2)]


def test_stacked_projection_equals_separate_ones_and_follows_updates():
    linears, x = _linears(), torch.randn(3, 5, 8)
    fused = FusedWeight(linears)
    weight = fused.weight
    with torch.no_grad():
        for out, lin in zip(fused(x), linears, strict=True):
            torch.testing.assert_close(out, lin(x))
        for lin in linears:
            lin.weight.add_(0.5)
        fused.refresh()
        for out, lin in zip(fused(x), linears, strict=True):
            torch.testing.assert_close(out, lin(x))
    assert fused.weight is weight  # refreshed in place: CUDA graphs keep the address


def test_folded_norm_weight_scales_the_input_dimension_and_follows_it():
    linears, norm_weight = _linears(), nn.Parameter(torch.randn(8))
    fused = FusedWeight(linears, norm_weight=norm_weight)
    stacked = torch.cat([lin.weight for lin in linears])
    torch.testing.assert_close(fused.weight, stacked * (1 + norm_weight))
    with torch.no_grad():
        norm_weight.mul_(2.0)  # an optimizer step on the norm alone must refresh the copy too
    fused.refresh()
    torch.testing.assert_close(fused.weight, stacked * (1 + norm_weight))


def test_biased_and_non_linear_layers_are_refused():
    with pytest.raises(ValueError, match="bias-free"):
        FusedWeight([nn.Linear(8, 4), nn.Linear(8, 4, bias=False)])
    assert fusable(_linears())
    assert not fusable([nn.Linear(8, 4)]) and not fusable([nn.Sequential(nn.Linear(8, 4, bias=False))])
