"""The small-attention inference path equals SDPA (grouped-query heads, finite masks, fully masked rows)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pi0_lightning.model import gemma


def test_small_attention_matches_sdpa():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 5, 16, generator=g)
    k, v = torch.randn(2, 2, 7, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g)
    allowed = torch.rand(2, 5, 7, generator=g) > 0.3
    allowed[1, 2] = False  # a fully masked row: openpi's finite mask gives it a uniform softmax, not NaN
    mask = gemma.additive_mask(allowed, torch.float32)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    with torch.no_grad():
        torch.testing.assert_close(gemma.attention(q, k, v, mask, 2), expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(gemma.attention(q, k, v, mask, 2)[1, :, 2], v[1].mean(1).repeat_interleave(4, 0))


def test_training_and_large_inputs_use_sdpa(monkeypatch):
    calls = []
    monkeypatch.setattr(gemma.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or a[0])
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4)
    mask = torch.zeros(1, 1, 3, 3)
    gemma.attention(q, k, k, mask, 1)  # grad enabled: SDPA (memory-efficient backward)
    with torch.no_grad():
        monkeypatch.setattr(gemma, "SMALL_ATTENTION", 10)
        gemma.attention(q, k, k, mask, 1)  # over the size limit: SDPA
    assert len(calls) == 2
