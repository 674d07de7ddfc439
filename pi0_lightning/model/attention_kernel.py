"""A Triton kernel for the denoising steps' attention: the action tokens' queries against the cached prefix (and, at
small batch, for the prefix pass itself).

At batch 1 each of the 180 suffix layer steps of a `sample_actions` call attends 8 query heads x 51 tokens to one
shared key/value head of 560 cached + 51 new tokens. As matmuls around a softmax this is a K/V concatenation and ~10
tiny kernels (a float32 score GEMM, a two-kernel softmax, a split-K value GEMM, casts and transposes): ~25 us per
layer step on an H100, against 10.5 us for this kernel (`python -m pi0_lightning.benchmarks.attention`). It is the
flash-decoding scheme, in two kernels:

1. `_partial_attention`: one program per (block of query rows, chunk of keys, batch x kv head). The query heads
   that share a kv head are packed as rows (row r = head g, token t with r = g * T + t), so every program loads each
   key/value tile once for all of them. The keys are two stretches read in place, the cache and the step's new
   keys, so nothing is concatenated. Scores are float32 (bf16 inputs, float32 accumulation, as openpi's
   `preferred_element_type=float32`), the additive mask is added in float32, and an online softmax keeps the chunk's
   row maximum, exp-sum and unnormalised `exp(s - max) @ V` in float32. In the denoising steps the queries and the
   step's new keys arrive unrotated: the kernel applies RoPE as it loads them (each half rotated in float32 and
   rounded back to bf16, as `gemma.apply_rope`), which saves a separate RoPE kernel per layer step.
2. `_combine`: the chunks' partial results are rescaled to the global maximum, summed, normalised and written
   heads-last, so that flattening the heads afterwards is free.

Deliberate difference from openpi's numerics: openpi normalises the probabilities and rounds them to bf16 before the
value einsum; here the unnormalised `exp(s - chunk max)` (in [0, 1]) is rounded to bf16 and the normalisation
happens in float32 at the end. Both round each probability once to bf16 (relative error 2^-9); outputs agree to
bf16 rounding (tested on CUDA), not bit for bit. Inference only (no backward); CUDA only; `attention` runs it in
place of `gemma.attention` where it applies (Triton importable, up to `MAX_PAIRS`), installed as the Gemma layers'
attention by `speed.py`. The tilings were tuned on an H100 only; other GPUs
get them where their shared memory allows (`tiling`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from pi0_lightning.model import gemma

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the matmul path is used
    triton = None

MIN_ROPE_DIM = 32
"""Smallest head dimension `cached_attention` rotates itself: its halves are the depth of a tensor-core dot (>= 16)."""

MAX_PAIRS = 16
"""The kernel runs for at most this many (batch element x kv head) pairs. Measured on an H100 at PI0's shape (8
query heads x 51 tokens, 611 keys, head_dim 256; BENCHMARKS.md), kernel vs the compiled matmul path per call: batch
1 10.5 vs 24.8 us, 8: 39.3 vs 83.5, 16: 77.5 vs 120.6; at 32 and 64 they are within a few per cent (162 vs 173,
317 vs 323), and the matmul path's large cuBLAS GEMMs are the safer choice there."""


@dataclass(frozen=True)
class Tiling:
    block_m: int  # query rows per program
    block_n: int  # keys per inner step
    chunk: int  # keys per program (flash-decoding split)
    warps: int
    stages: int

    def shared_memory(self, head_dim: int) -> int:
        """Estimated shared memory in bytes: the pipelined key and value tiles plus the query block (bf16), +10%."""
        return int(1.1 * 2 * head_dim * (2 * self.stages * self.block_n + self.block_m))


SMALL = Tiling(block_m=16, block_n=32, chunk=64, warps=4, stages=2)
LARGE = Tiling(block_m=128, block_n=32, chunk=256, warps=8, stages=3)


def shared_memory_limit(device: torch.device | None) -> int:
    """Shared memory one Triton program may use on `device`, in bytes; unbounded off CUDA (Triton's CPU interpreter,
    in tests)."""
    if device is None or device.type != "cuda":
        return 1 << 30
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


PREFIX_ROWS = 1024
"""Query rows per kv head (query heads sharing it x tokens) above which one pair already gets the large tiling: the
prefix pass at batch 1 (8 heads x 560 tokens, measured on an H100: 17.77 -> 17.60 ms per batch-1 call against the
float32 matmul path; BENCHMARKS.md)."""


def tiling(pairs: int, head_dim: int, device: torch.device, rows: int = 0) -> Tiling | None:
    """The tiling for `pairs` (batch x kv heads) of `rows` query rows each, from the same sweep: at batch 1 of the
    denoising steps, 16-row blocks and 64-key chunks spread the little work over ~260 programs; from batch 8, and
    for the prefix's thousands of rows, 128-row blocks load each key tile for more rows. Falls back to the small
    tiling, then to None (the matmul path), where the device has less shared memory than an H100."""
    limit = shared_memory_limit(device)
    for tile in (SMALL,) if pairs <= 4 and rows <= PREFIX_ROWS else (LARGE, SMALL):
        if tile.shared_memory(head_dim) <= limit:
            return tile
    return None


if triton is not None:

    @triton.jit
    def _rotated_halves(ptrs, dh, ok, cos_ptrs, sin_ptrs, HALF: tl.constexpr):
        """Rows at `ptrs` (last dim contiguous) rotated by half-split RoPE in float32, each half rounded back."""
        first = tl.load(ptrs + dh[None, :], mask=ok[:, None], other=0.0)
        second = tl.load(ptrs + HALF + dh[None, :], mask=ok[:, None], other=0.0)
        cos = tl.load(cos_ptrs, mask=ok[:, None], other=0.0)
        sin = tl.load(sin_ptrs, mask=ok[:, None], other=0.0)
        x1, x2 = first.to(tl.float32), second.to(tl.float32)
        return (x1 * cos - x2 * sin).to(first.dtype), (x2 * cos + x1 * sin).to(first.dtype)

    @triton.jit
    def _partial_attention(
        Q, K, V, K2, V2, Mask, Acc, Max, Sum, COS, SIN,
        T, S, S2, NSPLIT1, R, G, KV,
        sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sk2b, sk2h, sk2s, sv2b, sv2h, sv2s, smb, smt, sms, scb, sct,
        NSPLIT: tl.constexpr, SCALE: tl.constexpr, ROPE: tl.constexpr,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    ):  # fmt: skip
        rb = tl.program_id(0)
        split = tl.program_id(1)
        bh = tl.program_id(2)
        b = bh // KV
        h = bh % KV
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < R
        g = rows // T
        t = rows % T
        d = tl.arange(0, D)
        HALF: tl.constexpr = D // 2
        dh = tl.arange(0, HALF)
        q_ptrs = Q + b * sqb + (h * G + g)[:, None] * sqh + t[:, None] * sqt
        if ROPE:  # q (and this call's k) arrive unrotated: rotate the halves as loaded, as gemma.apply_rope
            q_table = b * scb + t[:, None] * sct + dh[None, :]
            q_first, q_second = _rotated_halves(q_ptrs, dh, row_ok, COS + q_table, SIN + q_table, HALF)
        else:
            q = tl.load(q_ptrs + d[None, :], mask=row_ok[:, None], other=0.0)

        # the keys are two stretches, read in place (no concatenated copy): the cache, then this call's new keys
        if split < NSPLIT1:
            k_base = K + b * skb + h * skh
            v_base = V + b * svb + h * svh
            k_step = sks
            v_step = svs
            start = split * CHUNK
            length = S
            column = 0
        else:
            k_base = K2 + b * sk2b + h * sk2h
            v_base = V2 + b * sv2b + h * sv2h
            k_step = sk2s
            v_step = sv2s
            start = (split - NSPLIT1) * CHUNK
            length = S2
            column = S
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for n0 in range(0, CHUNK, BLOCK_N):
            keys = start + n0 + tl.arange(0, BLOCK_N)
            key_ok = keys < length
            if ROPE:
                k_ptrs = k_base + keys[:, None] * k_step
                if split < NSPLIT1:  # the cache holds rotated keys
                    k_first = tl.load(k_ptrs + dh[None, :], mask=key_ok[:, None], other=0.0)
                    k_second = tl.load(k_ptrs + HALF + dh[None, :], mask=key_ok[:, None], other=0.0)
                else:  # this call's keys, at the same positions as its queries
                    k_table = b * scb + keys[:, None] * sct + dh[None, :]
                    k_first, k_second = _rotated_halves(k_ptrs, dh, key_ok, COS + k_table, SIN + k_table, HALF)
                s = tl.dot(q_first, tl.trans(k_first))
                s = tl.dot(q_second, tl.trans(k_second), s) * SCALE
            else:
                k = tl.load(k_base + keys[:, None] * k_step + d[None, :], mask=key_ok[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k)) * SCALE  # a constexpr: a float argument was typed fp64 under inductor
            bias = tl.load(
                Mask + b * smb + t[:, None] * smt + (column + keys)[None, :] * sms,
                mask=row_ok[:, None] & key_ok[None, :],
                other=0.0,
            )
            s = tl.where(key_ok[None, :], s + bias.to(tl.float32), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + keys[:, None] * v_step + d[None, :], mask=key_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

        base = (bh * NSPLIT + split) * R
        tl.store(Acc + (base + rows)[:, None] * D + d[None, :], acc, mask=row_ok[:, None])
        tl.store(Max + base + rows, m_i, mask=row_ok)
        tl.store(Sum + base + rows, l_i, mask=row_ok)

    @triton.jit
    def _combine(
        Acc, Max, Sum, Out,
        T, R, G, KV,
        sob, soh, sot,
        NSPLIT: tl.constexpr,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        rb = tl.program_id(0)
        bh = tl.program_id(2)
        b = bh // KV
        h = bh % KV
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < R
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for split in range(0, NSPLIT):
            m = tl.maximum(m, tl.load(Max + (bh * NSPLIT + split) * R + rows, mask=row_ok, other=0.0))
        total = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for split in range(0, NSPLIT):
            base = (bh * NSPLIT + split) * R
            w = tl.exp(tl.load(Max + base + rows, mask=row_ok, other=0.0) - m)
            total += w * tl.load(Sum + base + rows, mask=row_ok, other=0.0)
            part = tl.load(Acc + (base + rows)[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0)
            acc += w[:, None] * part
        out = acc / total[:, None]
        g = rows // T
        t = rows % T
        o_ptrs = Out + b * sob + (h * G + g)[:, None] * soh + t[:, None] * sot + d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])


def tiling_for(q: torch.Tensor, num_kv_heads: int) -> Tiling | None:
    """The tiling `attention` runs `cached_attention` with, or None for the matmul path: Triton present,
    bf16/fp16 on CUDA (float32 models keep the exact matmul path), a power-of-two head dimension, at most `MAX_PAIRS`
    batch x kv-head pairs, and a tiling that fits the device."""
    d = q.shape[-1]
    pairs = q.shape[0] * num_kv_heads
    usable = (
        triton is not None
        and q.is_cuda
        and q.dtype in (torch.bfloat16, torch.float16)
        and d >= 16
        and d & (d - 1) == 0
        and pairs <= MAX_PAIRS
    )
    return tiling(pairs, d, q.device, rows=q.shape[1] // num_kv_heads * q.shape[2]) if usable else None


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    num_kv_heads: int,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    tile: Tiling | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Grouped-query attention as `gemma.attention`, always by the kernel: q (B, H, T, D), k / v (B, KV, S, D),
    additive mask (B, 1, T, S + S_new) -> (B, H, T, D) in q's dtype. `k_new` / `v_new` (B, KV, S_new, D), if given,
    are keys and values after k / v (the cache), read where they are instead of concatenated. The last dimension of
    every input must be contiguous. The output is a transposed view of a contiguous (B, T, H, D) tensor, so that the
    model's following `.transpose(1, 2).flatten(2)` costs no copy. `tile`: the tiling, by default
    `tiling(B * KV, D, device)`. `rope`: the (cos, sin) tables (B, 1, T, D / 2) of `gemma.rope_tables` when q and
    `k_new` are not rotated yet: the kernel rotates them as it loads them (the cache must be rotated already)."""
    b, h, t, d = q.shape
    s = k.shape[2]
    if k_new is None or v_new is None:
        k_new, v_new = k, v  # an empty second stretch
        s_new = 0
    else:
        s_new = k_new.shape[2]
    group = h // num_kv_heads
    rows = group * t
    tile = tile or tiling(b * num_kv_heads, d, q.device)
    if tile is None:
        raise ValueError(f"cached_attention: no tiling fits this device's shared memory at head_dim {d}")
    if any(x.stride(-1) != 1 for x in (q, k, v, k_new, v_new)):
        raise ValueError("cached_attention needs a contiguous head dimension")
    if rope is not None and (s_new != t or d < MIN_ROPE_DIM):
        raise ValueError(
            f"cached_attention: RoPE needs this call's keys (one per query) and heads of >= {MIN_ROPE_DIM}"
        )
    nsplit1 = triton.cdiv(s, tile.chunk)
    nsplit = nsplit1 + triton.cdiv(s_new, tile.chunk)
    acc = torch.empty(b * num_kv_heads * nsplit * rows * d, device=q.device, dtype=torch.float32)
    row_max = torch.empty(b * num_kv_heads * nsplit * rows, device=q.device, dtype=torch.float32)
    row_sum = torch.empty_like(row_max)
    cos, sin = rope if rope is not None else (row_max, row_max)  # (row_max: not read)
    out = torch.empty(b, t, h, d, device=q.device, dtype=q.dtype).transpose(1, 2)
    mask = mask.expand(b, 1, t, s + s_new)
    # Triton launches on the current device: switch to q's (a model on another GPU than the current one); compiled
    # code has inductor's own device guard
    guard = torch.cuda.device(q.device) if q.is_cuda and not torch.compiler.is_compiling() else nullcontext()
    with guard:
        grid = (triton.cdiv(rows, tile.block_m), nsplit, b * num_kv_heads)
        _partial_attention[grid](
            q, k, v, k_new, v_new, mask, acc, row_max, row_sum, cos, sin,
            t, s, s_new, nsplit1, rows, group, num_kv_heads,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), k_new.stride(0), k_new.stride(1), k_new.stride(2),
            v_new.stride(0), v_new.stride(1), v_new.stride(2), mask.stride(0), mask.stride(2), mask.stride(3),
            cos.stride(0), cos.stride(-2) if rope is not None else 0,
            NSPLIT=nsplit, SCALE=d**-0.5, ROPE=rope is not None,
            D=d, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, CHUNK=tile.chunk,
            num_warps=tile.warps, num_stages=tile.stages,
        )  # fmt: skip
        combine_m, combine_d = 16, min(64, d)  # the combine's tiling hardly matters (+-0.5 us in the sweep)
        _combine[(triton.cdiv(rows, combine_m), d // combine_d, b * num_kv_heads)](
            acc, row_max, row_sum, out,
            t, rows, group, num_kv_heads,
            out.stride(0), out.stride(1), out.stride(2),
            NSPLIT=nsplit, D=d, BLOCK_M=combine_m, BLOCK_D=combine_d,
        )  # fmt: skip
    return out


def rotate_qk(
    q: torch.Tensor, k: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k rotated by `gemma.apply_rope` in one pass (one fused kernel when compiled, instead of two)."""
    qk = gemma.apply_rope(torch.cat([q, k], dim=1), *rope)
    return qk.split([q.shape[1], k.shape[1]], dim=1)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    num_kv_heads: int,
    cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """`gemma.attention` with this kernel where it applies: inference in bf16 on CUDA with several queries against
    a cache (the denoising steps; the cache is read in place), or without a cache up to `gemma.SMALL_ATTENTION`
    scores (the prefix pass at small batch). Everything else goes to `gemma.attention`. `rope`: (cos, sin) tables
    when q and k are not rotated yet; the kernel rotates them as it loads them, other paths first."""
    b, h, t, d = q.shape
    tile = tiling_for(q, num_kv_heads) if t > 1 and not torch.is_grad_enabled() else None
    if rope is not None and (cache is None or tile is None or d < MIN_ROPE_DIM):
        q, k = rotate_qk(q, k, rope)
        rope = None
    if tile is None:
        return gemma.attention(q, k, v, mask, num_kv_heads, cache)
    if cache is not None:
        return cached_attention(q, cache[0], cache[1], mask, num_kv_heads, k, v, tile=tile, rope=rope)
    if b * h * t * k.shape[2] <= gemma.SMALL_ATTENTION:
        return cached_attention(q, k, v, mask, num_kv_heads, tile=tile)
    return gemma.attention(q, k, v, mask, num_kv_heads)
