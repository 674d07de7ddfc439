"""Gemma experts with joint attention ("mixture of transformers"), as in openpi's `gemma.py`.

Each depth is one `JointLayer` holding one `ExpertLayer` per expert (0 = PaliGemma, 1 = action expert). Every expert
normalises and projects its own tokens; queries, keys and values of all experts are concatenated along the sequence
and attend jointly; each expert then applies its own output projection and MLP to its own slice. `JointLayer` is the
unit for FSDP wrapping, activation checkpointing and compilation.

Numerics (openpi, verified against its JAX code by the parity tests):
- RMSNorm normalises in float32 and scales by (1 + w); PI0.5's action expert uses adaptive RMSNorm
  (scale, shift, gate from a Dense of the time condition) and gated residuals.
- RoPE splits heads in halves (not interleaved), wavelength 10000, computed in float32.
- Attention masks are additive with openpi's finite `-2.3819763e38`, so fully masked rows (padding, masked cameras)
  give a uniform softmax exactly as in JAX instead of NaNs.
- GeGLU with tanh GELU; index 0 of openpi's `gating_einsum` is the gated branch (`gate_proj`).

This module is the reference maths only. The inference speed paths (stacked projections, the Triton attention kernel,
fused few-row GEMMs) and activation checkpointing replace three named hook points of `JointLayer` from outside
(`speed.py`): `project_qkv`, `mlp` and `attention`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pi0_lightning.model.config import GemmaConfig

BIG_NEG = -2.3819763e38
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class RMSNorm(nn.Module):
    """RMSNorm with the (1 + w) convention, or adaptive when `cond_dim` is given (PI0.5 action expert).

    Returns `(y, gate)`; `gate` is None for the plain norm and multiplies the residual branch otherwise.
    """

    def __init__(self, dim: int, eps: float = 1e-6, cond_dim: int | None = None):
        super().__init__()
        self.eps = eps
        if cond_dim is None:
            self.weight = nn.Parameter(torch.zeros(dim))
            self.dense = None
        else:
            self.weight = None
            self.dense = nn.Linear(cond_dim, 3 * dim)
            nn.init.zeros_(self.dense.weight)
            nn.init.zeros_(self.dense.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.dense is None:
            return (normed * (1.0 + self.weight.float())).to(x.dtype), None
        if cond is None:
            raise ValueError("adaptive RMSNorm needs a condition (the time embedding)")
        scale, shift, gate = self.dense(cond.to(self.dense.weight.dtype))[:, None, :].chunk(3, dim=-1)
        return (normed * (1.0 + scale.float()) + shift.float()).to(x.dtype), gate.to(x.dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, max_wavelength: float = 10_000.0):
    """cos/sin tables (B, 1, S, head_dim/2) in float32 for integer positions (B, S)."""
    exponents = (2.0 / head_dim) * torch.arange(head_dim // 2, dtype=torch.float32, device=positions.device)
    timescale = max_wavelength**exponents
    radians = positions.to(torch.float32)[..., None] / timescale
    return torch.cos(radians)[:, None], torch.sin(radians)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, S, H) by half-split RoPE; computed in float32, returned in x's dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean (B, T, S) -> additive (B, 1, T, S) with openpi's finite big negative."""
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return out.masked_fill_(~mask, BIG_NEG)[:, None]


class GeGLU(nn.Module):
    def __init__(self, width: int, mlp_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(width, mlp_dim, bias=False)
        self.up_proj = nn.Linear(width, mlp_dim, bias=False)
        self.down_proj = nn.Linear(mlp_dim, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class ExpertLayer(nn.Module):
    """One expert's weights at one depth."""

    def __init__(self, cfg: GemmaConfig, eps: float, adarms: bool):
        super().__init__()
        cond_dim = cfg.width if adarms else None
        self.attn_norm = RMSNorm(cfg.width, eps, cond_dim)
        self.q_proj = nn.Linear(cfg.width, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.width, bias=False)
        self.ffn_norm = RMSNorm(cfg.width, eps, cond_dim)
        self.mlp = GeGLU(cfg.width, cfg.mlp_dim)


SMALL_ATTENTION = 1 << 22
"""Attention without gradients with at most this many scores (batch * heads * queries * keys) runs as two grouped
matmuls around a float32 softmax instead of SDPA: at batch 1 SDPA's fixed cost dominates (measured on an H100 for
the prefix pass, 8 heads x 560 tokens: SDPA 18.93 ms per batch-1 call, the matmul path 18.18; BENCHMARKS.md)."""


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    num_kv_heads: int,
    cache: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Grouped-query attention: q (B, H, T, D), k / v (B, KV, S, D), additive mask (B, 1, T, S_cache + S) ->
    (B, H, T, D). Query head i reads key/value head i // (H / KV), as SDPA's `enable_gqa`. `cache`: keys and values
    (B, KV, S_cache, D) of earlier tokens, which come before k / v.

    Up to `SMALL_ATTENTION` scores without gradients: openpi's einsums, float32 scores and softmax, probabilities
    rounded to v's dtype. Otherwise (training, large inputs) SDPA, whose memory-efficient backward keeps training
    memory flat in the sequence length."""
    if cache is not None:
        k = torch.cat([cache[0], k], dim=2)
        v = torch.cat([cache[1], v], dim=2)
    b, h, t, d = q.shape
    if torch.is_grad_enabled() or b * h * t * k.shape[2] > SMALL_ATTENTION:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), enable_gqa=num_kv_heads != h)
    g = h // num_kv_heads
    scores = q.reshape(b, num_kv_heads, g * t, d).float() @ k.float().transpose(-1, -2) * d**-0.5
    scores = scores.view(b, num_kv_heads, g, t, -1) + mask.float()[:, :, None]
    probs = scores.softmax(-1).to(v.dtype).view(b, num_kv_heads, g * t, -1)
    return (probs @ v).view(b, h, t, d)


def residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """x + y, or PI0.5's gated residual x + y * gate."""
    return x + y if gate is None else x + y * gate


class JointLayer(nn.Module):
    """One depth of all experts with joint attention over the concatenation of their tokens."""

    def __init__(self, configs: Sequence[GemmaConfig], eps: float, adarms: Sequence[bool]):
        super().__init__()
        self.num_heads = configs[0].num_heads
        self.num_kv_heads = configs[0].num_kv_heads
        self.head_dim = configs[0].head_dim
        self.experts = nn.ModuleList(ExpertLayer(c, eps, a) for c, a in zip(configs, adarms, strict=True))

    def project_qkv(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert i's queries, keys and values of its normalised tokens x (hook: stacked weights at inference)."""
        expert = self.experts[i]
        return expert.q_proj(x), expert.k_proj(x), expert.v_proj(x)

    def mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Expert i's GeGLU MLP (hook: stacked gate/up weights at inference)."""
        return self.experts[i].mlp(x)

    attention = staticmethod(attention)
    """The joint attention (hook: the Triton kernel at inference)."""

    def forward(
        self,
        hs: list[torch.Tensor | None],
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        conds: Sequence[torch.Tensor | None],
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        return_kv: bool = True,
        kv_only: bool = False,
    ) -> tuple[list[torch.Tensor | None], tuple[torch.Tensor, torch.Tensor] | None]:
        """hs: per-expert hidden states (B, T_i, D_i) or None; mask: additive (B, 1, T, S) where T = sum T_i and
        S = T plus the cached length; kv_cache: (K, V) of earlier tokens, already rotated, which are prepended.
        Returns the new hidden states and this call's rotated (K, V) (without the cache); a speed path may return
        None for them when `return_kv` is False and there is a cache. `kv_only` (no cache given): stop after the
        keys and values and return no hidden states (all None), for a last layer whose outputs nothing reads."""
        if kv_only and kv_cache is not None:
            raise ValueError("kv_only computes a cache; it takes no cache")
        qs, ks, vs, gates = [], [], [], []
        for i, (expert, h, cond) in enumerate(zip(self.experts, hs, conds, strict=True)):
            if h is None:
                gates.append(None)
                continue
            b, t, _ = h.shape
            x, gate = expert.attn_norm(h, cond)
            gates.append(gate)
            q, k, v = self.project_qkv(i, x)
            qs.append(q.view(b, t, self.num_heads, self.head_dim))
            ks.append(k.view(b, t, self.num_kv_heads, self.head_dim))
            vs.append(v.view(b, t, self.num_kv_heads, self.head_dim))
        # (B, heads, T, D), compact: this call's keys and values may become a cache
        k = apply_rope(torch.cat(ks, 1).transpose(1, 2), *rope)
        v = torch.cat(vs, 1).transpose(1, 2)
        if kv_only:
            return [None] * len(hs), (k, v)
        q = apply_rope(torch.cat(qs, 1).transpose(1, 2), *rope)
        out = self.attention(q, k, v, mask, self.num_kv_heads, kv_cache).transpose(1, 2).flatten(2)

        new_hs: list[torch.Tensor | None] = []
        start = 0
        for i, (expert, h, cond, gate) in enumerate(zip(self.experts, hs, conds, gates, strict=True)):
            if h is None:
                new_hs.append(None)
                continue
            o_in, start = out[:, start : start + h.shape[1]], start + h.shape[1]
            h = residual(h, expert.o_proj(o_in), gate)
            x, gate = expert.ffn_norm(h, cond)
            new_hs.append(residual(h, self.mlp(i, x), gate))
        return new_hs, (k, v)


class JointGemma(nn.Module):
    """Token embedding (expert 0 only), `depth` JointLayers and one final norm per expert."""

    def __init__(self, configs: Sequence[GemmaConfig], vocab_size: int, eps: float, adarms: Sequence[bool]):
        super().__init__()
        depths = {c.depth for c in configs}
        if len(depths) != 1:
            raise ValueError(f"all experts must have the same depth, got {sorted(depths)}")
        self.configs = list(configs)
        self.embed_tokens = nn.Embedding(vocab_size, configs[0].width)
        self.layers = nn.ModuleList(JointLayer(configs, eps, adarms) for _ in range(configs[0].depth))
        self.norms = nn.ModuleList(
            RMSNorm(c.width, eps, c.width if a else None) for c, a in zip(configs, adarms, strict=True)
        )

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        table = self.embed_tokens.weight
        # openpi casts sqrt(width) to the table dtype before the multiply (a Python float: no host-device copy)
        scale = float(torch.tensor(self.configs[0].width ** 0.5, dtype=table.dtype))
        return F.embedding(tokens, table) * scale

    def attention_inputs(
        self, positions: torch.Tensor, mask: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """RoPE tables for positions (B, T) and the additive form of the boolean mask (B, T, S), shared by all layers
        (and by all denoising steps of one sampling call, which compute them once)."""
        dtype = self.layers[0].experts[0].q_proj.weight.dtype
        return rope_tables(positions, self.layers[0].head_dim), additive_mask(mask, dtype)

    def forward(
        self,
        hs: list[torch.Tensor | None],
        positions: torch.Tensor,
        mask: torch.Tensor,
        conds: Sequence[torch.Tensor | None] | None = None,
        kv_cache: KVCache | None = None,
        return_kv: bool = False,
        cache_only: bool = False,
    ) -> tuple[list[torch.Tensor | None], KVCache | None]:
        """Run all layers. positions (B, T) for the new tokens; mask boolean (B, T, S). `cache_only` (with
        `return_kv`, no `kv_cache`): only the keys and values are wanted (a prefix pass), so the last layer stops
        after its projections (its attention, o_proj and MLP, 1/depth of the work, feed nothing), no final norm runs
        and the hidden states come back as None."""
        rope, amask = self.attention_inputs(positions, mask)
        return self.run(hs, rope, amask, conds, kv_cache, return_kv, cache_only=cache_only)

    def run(
        self,
        hs: list[torch.Tensor | None],
        rope: tuple[torch.Tensor, torch.Tensor],
        amask: torch.Tensor,
        conds: Sequence[torch.Tensor | None] | None = None,
        kv_cache: KVCache | None = None,
        return_kv: bool = False,
        final_norms: bool = True,
        cache_only: bool = False,
    ) -> tuple[list[torch.Tensor | None], KVCache | None]:
        """`forward` with its `attention_inputs` given; `final_norms=False` returns the hidden states before the
        experts' final norms (the sampler applies that norm inside its compiled per-step update)."""
        if cache_only and (not return_kv or kv_cache is not None):
            raise ValueError("cache_only needs return_kv=True and no kv_cache")
        conds = conds if conds is not None else [None] * len(self.configs)
        dtype = self.layers[0].experts[0].q_proj.weight.dtype
        hs = [h.to(dtype) if h is not None else None for h in hs]
        cache_out: KVCache = []
        for i, layer in enumerate(self.layers):
            cache_i = kv_cache[i] if kv_cache is not None else None
            hs, kv = layer(hs, rope, amask, conds, cache_i, return_kv, cache_only and i == len(self.layers) - 1)
            if return_kv:
                cache_out.append(kv)
        if final_norms and not cache_only:
            hs = [norm(h, c)[0] if h is not None else None for norm, h, c in zip(self.norms, hs, conds, strict=True)]
        return hs, (cache_out if return_kv else None)
