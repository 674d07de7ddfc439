"""Triton GEMMs for few-row inference with their neighbours fused in: the RMSNorm before, the GeGLU or a (gated)
residual add after.

At batch 1 a denoising step's action-expert layer is 51 rows. Its GEMMs only read weights, cuBLAS runs the
1024-column ones at 0.8-1.0 TB/s with a separate split-K reduction, and the elementwise kernels around them (norms,
GeGLU, residual adds) cost ~1.5-2 us each plus a launch gap on an H100. Here:

- `rms_eps`: the RMSNorm before the GEMM. Its (1 + w) is folded into the weights once (`FusedWeight`'s
  `norm_weight`), and the rows' float32 sum of squares is taken from the tiles the GEMM loads anyway, so the epilogue
  only scales each row by its 1/rms. openpi rounds the normalised rows to bf16 before the GEMM; here the folded
  weights are rounded instead, a difference at bf16 rounding level;
- `geglu`: W holds [gate; up] stacked (the inference copy of `GeGLU`), and the output is `gelu_tanh(gate) * up`,
  with gate, up and the GELU rounded to the input dtype in between as the unfused path does;
- `residual`: the output is `residual + x @ W.T` (PI0.5: `residual + (x @ W.T) * gate`), the product rounded first.

Reading 4-8 MB of weights fast needs most SMs busy, but 1024 output columns in tiles wide enough to amortise the
rows' re-reads give only 32 programs. So K is split (`Tiling.split`): each program writes its float32 partial tile to
a workspace and bumps a per-tile counter; the last one to arrive sums the partials in a fixed order, applies the
epilogue, stores, and resets the counter to zero for the next call. No memset and no reduction kernel per call, so
it suits CUDA graphs. The workspace and counters are allocated once per device (never during a graph capture) and
shared by all calls, which are ordered on the stream; two streams running these GEMMs concurrently would race on
them (the samplers use one).

Tried and dropped (BENCHMARKS.md, H100): the RMSNorm as a prologue (normalising the rows while loading them,
openpi's rounding exactly) made the GEMMs 2-6x slower; programmatic dependent launch with an L2 prefetch of each
program's weights before waiting for the previous kernel made batch 1 slower (18.5 -> 19.1 ms).

Float32 accumulation in a different order than cuBLAS, so outputs agree to bf16 rounding, not bit for bit. Inference
only; CUDA (or Triton's CPU interpreter in tests). Wrapped as a custom op, so torch.compile calls it as one opaque
kernel inside the compiled blocks. The Gemma layers run these GEMMs in the denoising steps where `speed.py` installs
them.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from pi0_lightning.model import attention_kernel
from pi0_lightning.model.attention_kernel import triton

MAX_ROWS = 64
"""Rows (batch x tokens) up to which the fused GEMMs run: one block of rows, batch 1 of PI0's 51 action tokens. More
rows re-read every weight tile per row block, where cuBLAS's tiling wins."""
BLOCK_M = 64


@dataclass(frozen=True)
class Tiling:
    block_n: int  # output columns per program
    block_k: int  # depth per inner step
    split: int  # programs along K (1: no split)
    warps: int = 4
    stages: int = 4


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _small_linear(  # K is a constexpr: a few weight shapes, and loop bounds the interpreter can read
        X, W, Y, R, G, WS, COUNT, M, N, T, M_PAD, sxm, swn, sym, srm, sg,
        K: tl.constexpr, NORM: tl.constexpr, EPS: tl.constexpr, GEGLU: tl.constexpr, RESIDUAL: tl.constexpr,
        GATED: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # G: the residual gate; row r reads row r // T of it (one per batch element)
        pid_n, part, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        row_ok = rm < M
        col_ok = rn < N
        PART_K: tl.constexpr = K // SPLIT
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        squares = tl.zeros([BLOCK_M], tl.float32)
        for k_part in range(0, PART_K, BLOCK_K):
            k0 = part * PART_K + k_part
            k_ok = (k0 + rk) < K
            x = tl.load(X + rm[:, None] * sxm + (k0 + rk)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if NORM:  # the rows' sum of squares in float32, as gemma.RMSNorm, from the tiles the GEMM reads anyway
                squares += tl.sum(x.to(tl.float32) * x.to(tl.float32), 1)
            w_mask = col_ok[:, None] & k_ok[None, :]
            w = tl.load(W + rn[:, None] * swn + (k0 + rk)[None, :], mask=w_mask, other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)
            if GEGLU:
                w_up = tl.load(W + (rn + N)[:, None] * swn + (k0 + rk)[None, :], mask=w_mask, other=0.0)
                acc_up = tl.dot(x, tl.trans(w_up), acc_up)
        last = True
        if SPLIT > 1:
            # workspace [SPLIT, 2 (gate, up), M_PAD, N] float32; every program writes its whole tile (masked rows
            # are zeros), then the last of the tile's SPLIT programs sums them in part order
            tile = rm[:, None] * N + rn[None, :]
            plane = M_PAD * N
            tl.store(WS + (2 * part) * plane + tile, acc, mask=col_ok[None, :])
            if GEGLU:
                tl.store(WS + (2 * part + 1) * plane + tile, acc_up, mask=col_ok[None, :])
            if NORM:  # then [SPLIT, tiles along N, M_PAD] partial sums of squares
                tl.store(WS + 2 * SPLIT * plane + (part * tl.num_programs(0) + pid_n) * M_PAD + rm, squares)
            tl.debug_barrier()  # all of this program's stores issued before its (release) arrival
            counter = COUNT + pid_m * tl.num_programs(0) + pid_n
            last = tl.atomic_add(counter, 1, sem="acq_rel") == SPLIT - 1
            if last:
                acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                for s in tl.static_range(SPLIT):  # .cg: from L2, where the other programs' partials are
                    part_ptrs = WS + (2 * s) * plane + tile
                    acc += tl.load(part_ptrs, mask=col_ok[None, :], other=0.0, cache_modifier=".cg")
                    if GEGLU:
                        acc_up += tl.load(part_ptrs + plane, mask=col_ok[None, :], other=0.0, cache_modifier=".cg")
                if NORM:
                    squares = tl.zeros([BLOCK_M], tl.float32)
                    for s in tl.static_range(SPLIT):
                        sq_ptrs = WS + 2 * SPLIT * plane + (s * tl.num_programs(0) + pid_n) * M_PAD + rm
                        squares += tl.load(sq_ptrs, cache_modifier=".cg")
                tl.atomic_xchg(counter, 0)  # ready for the next call
        if last:
            out_ty = Y.dtype.element_ty
            if NORM:  # W holds W * (1 + norm weight): the row's 1/rms is all that is left of the RMSNorm
                inv_rms = tl.rsqrt(squares / K + EPS)
                acc *= inv_rms[:, None]
                acc_up *= inv_rms[:, None]
            out = acc.to(out_ty).to(tl.float32)  # the GEMM's output, rounded as a separate GEMM would store it
            if GEGLU:
                inner = 0.7978845608028654 * (out + 0.044715 * out * out * out)
                gelu = (out * tl.sigmoid(2.0 * inner)).to(out_ty).to(tl.float32)  # 0.5 (1 + tanh u) = sigmoid(2u)
                out = gelu * acc_up.to(out_ty).to(tl.float32)
            tile_ok = row_ok[:, None] & col_ok[None, :]
            if RESIDUAL:
                if GATED:  # `x + y * gate`, the product rounded as the unfused path stores it
                    gate = tl.load(G + (rm // T)[:, None] * sg + rn[None, :], mask=tile_ok, other=0.0)
                    out = (out * gate.to(tl.float32)).to(out_ty).to(tl.float32)
                out += tl.load(R + rm[:, None] * srm + rn[None, :], mask=tile_ok).to(tl.float32)
            tl.store(Y + rm[:, None] * sym + rn[None, :], out.to(out_ty), mask=tile_ok)


def usable(x: torch.Tensor) -> bool:
    """Whether `linear` should run: Triton present, bf16/fp16 on CUDA, at most `MAX_ROWS` rows."""
    rows = x.numel() // x.shape[-1]
    half = x.dtype in (torch.bfloat16, torch.float16)
    return triton is not None and x.is_cuda and half and rows <= MAX_ROWS


def tiling(n: int, k: int, geglu: bool = False, norm: bool = False, device: torch.device | None = None) -> Tiling:
    """The tiling for an (n, k) weight at 51 rows, from the sweep on an H100 (`benchmarks.skinny_gemm`,
    BENCHMARKS.md): 32-column tiles; K split while the programs stay at about one per SM (not with the norm, whose
    sums of squares would then need a reduction too); fewer pipeline stages where shared memory is smaller."""
    block_n, block_k, split, stages = 32, 128, 1, 4
    if norm:
        block_k, stages = (128 if geglu else 256), 3
    else:
        while split < 8 and -(-n // block_n) * split * 2 <= 160 and k % (split * 2 * block_k) == 0:
            split *= 2
    limit = attention_kernel.shared_memory_limit(device)
    while stages > 2 and shared_memory(block_n, block_k, stages, geglu) > limit:
        stages -= 1
    return Tiling(block_n=block_n, block_k=block_k, split=split, stages=stages)


def shared_memory(block_n: int, block_k: int, stages: int, geglu: bool) -> int:
    """Estimated bytes: the pipelined bf16 row and weight tiles, +10%."""
    return int(1.1 * stages * 2 * block_k * (BLOCK_M + block_n * (2 if geglu else 1)))


_WORKSPACES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_RETIRED: list[tuple[torch.Tensor, torch.Tensor]] = []  # outgrown workspaces stay alive: captured graphs use them


def _workspace(device: torch.device, floats: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The device's float32 partials and int32 per-tile counters (zero between calls), grown to at least the size."""
    found = _WORKSPACES.get(device)
    if found is not None and found[0].numel() >= floats and found[1].numel() >= counters:
        return found
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("small_gemm: run the GEMMs once before a CUDA graph capture (it allocates their workspace)")
    if found is not None:
        _RETIRED.append(found)
        floats, counters = max(floats, found[0].numel()), max(counters, found[1].numel())
    found = (torch.empty(floats, device=device), torch.zeros(counters, device=device, dtype=torch.int32))
    _WORKSPACES[device] = found
    return found


@torch.library.custom_op("pi0_lightning::small_linear", mutates_args=())
def _small_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    rms_eps: float | None,
    geglu: bool,
    residual: torch.Tensor | None,
    residual_gate: torch.Tensor | None,
    block_n: int,
    block_k: int,
    split: int,
    warps: int,
    stages: int,
) -> torch.Tensor:
    b, t, k = x.shape
    x2 = x.reshape(b * t, k)
    if x2.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("small_gemm.linear needs a contiguous last dimension")
    m = x2.shape[0]
    n = weight.shape[0] // 2 if geglu else weight.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    res = residual.reshape(m, n) if residual is not None else out
    gate = residual_gate.reshape(-1, n) if residual_gate is not None else out  # (B, 1, N): a row per batch element
    grid = (triton.cdiv(n, block_n), split, triton.cdiv(m, BLOCK_M))
    m_pad = grid[2] * BLOCK_M
    if split > 1:
        ws, count = _workspace(x.device, split * (2 * n + grid[0]) * m_pad, grid[0] * grid[2])
    else:
        ws, count = out, out  # not read
    with torch.cuda.device(x.device) if x.is_cuda else nullcontext():  # Triton launches on the current device
        _small_linear[grid](
            x2, weight, out, res, gate, ws, count, m, n, t, m_pad,
            x2.stride(0), weight.stride(0), out.stride(0), res.stride(0), gate.stride(0),
            K=k, NORM=rms_eps is not None, EPS=rms_eps or 0.0, GEGLU=geglu, RESIDUAL=residual is not None,
            GATED=residual_gate is not None, SPLIT=split,
            BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return out.view(b, t, n)


@_small_linear_op.register_fake
def _(x, weight, rms_eps, geglu, residual, residual_gate, block_n, block_k, split, warps, stages):
    return x.new_empty(*x.shape[:-1], weight.shape[0] // 2 if geglu else weight.shape[0])


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    rms_eps: float | None = None,
    geglu: bool = False,
    residual: torch.Tensor | None = None,
    residual_gate: torch.Tensor | None = None,
    tile: Tiling | None = None,
) -> torch.Tensor:
    """x (B, T, K) @ weight.T with the fusions of the module docstring; weight (N, K), or (2N, K) with `geglu`.
    `rms_eps`: the RMSNorm before the GEMM, with its (1 + w) already folded into `weight` (`FusedWeight`'s
    `norm_weight`); `residual` (B, T, N); `residual_gate` (B, 1, N) multiplies the product before the residual add.
    `tile` overrides `tiling` (benchmarks). Returns (B, T, N) in x's dtype."""
    n, k = (weight.shape[0] // 2 if geglu else weight.shape[0]), weight.shape[1]
    tile = tile or tiling(n, k, geglu, rms_eps is not None, x.device)
    if tile.split > 1 and k % (tile.split * tile.block_k):
        raise ValueError(f"small_gemm: K={k} is not a multiple of split x block_k in {tile}")
    tiling_args = (tile.block_n, tile.block_k, tile.split, tile.warps, tile.stages)
    return _small_linear_op(x, weight, rms_eps, geglu, residual, residual_gate, *tiling_args)
