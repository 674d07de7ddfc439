"""The vision tower's GEMMs in the batch-1 prefix pass (two cameras, 512 token rows): cuBLAS as the model runs them
against a plain tiled Triton GEMM over a sweep of tilings, split K included. Is a custom GEMM worth building there?

    python -m pi0_lightning.benchmarks.prefix_gemm [--rows 512] [--quick] [--out prefix_gemm.json]

Answer on an H100 (BENCHMARKS.md, session 8): no. cuBLAS beat the best tiling of the quick sweep on every op (q, k,
v or o 5.65 against 7.40 us; fc1 10.76 against 15.48; fc2 18.03 against 21.62), and the 1152-column GEMMs run at
5.65 us, not the 8.4 us the session-6 profile suggested. Stacking q/k/v (9.48 us against 3 x 5.65) is the only gain
it shows; session 5 measured that stacked path in the model and it was not faster end to end.

Why: session 6's kernel profile put SigLIP's 1152-wide GEMMs at ~160 TFLOP/s. At 512 rows a 128 x 128 output tile
grid of a 1152-column GEMM has 36 tiles for 132 SMs, and fc1's 4304 columns make 136 tiles, four more than one wave.
Smaller tiles or a K split fill the GPU; this measures how much that is worth before anything goes into the model.
Ops (bf16, float32 accumulation, bias added as the model's `nn.Linear`s do): q, k, v and o (1152 -> 1152), q/k/v
stacked (1152 -> 3456), fc1 (1152 -> 4304) and fc2 (4304 -> 1152). Each variant is timed as a CUDA graph of 40 calls
rotating over 8 weight copies, so weights come from memory as in the model. Split K adds float32 partials atomically
into an output that a memset inside the timed call zeroes, then a cast adds the bias (both timed), so that the
variant's cost is what the model would pay.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pi0_lightning.benchmarks import COPIES, graph_time_us, rotating, write_json
from pi0_lightning.model.kernels import triton

OPS = {  # name: (K, N, calls per SigLIP layer)
    "q, k, v or o": (1152, 1152, 4),
    "q/k/v stacked": (1152, 3456, 0),
    "fc1": (1152, 4304, 1),
    "fc2": (4304, 1152, 1),
}
DEPTH = 27  # SigLIP So400m layers


@dataclass(frozen=True)
class Tile:
    block_m: int
    block_n: int
    block_k: int
    split: int
    warps: int
    stages: int

    def __str__(self) -> str:
        return (f"{self.block_m}x{self.block_n}x{self.block_k} split {self.split}, {self.warps} warps, "
                f"{self.stages} stages")  # fmt: skip


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _tiled_gemm(
        X, W, B, Y, M,
        N: tl.constexpr, K: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """Y = X @ W.T (+ B): program (tile, K part). SPLIT == 1 stores bf16 with the bias; otherwise adds the float32
        partial to a zeroed float32 Y (the bias comes later)."""
        tile = tl.program_id(0)
        part = tl.program_id(1)
        tiles_n: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
        rm = (tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        STEPS: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
        PER: tl.constexpr = (STEPS + SPLIT - 1) // SPLIT
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for s in range(0, PER):  # constexpr bounds: the CPU interpreter needs them
            k = (part * PER + s) * BLOCK_K + rk
            x = tl.load(X + rm[:, None] * K + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)
            w = tl.load(W + rn[:, None] * K + k[None, :], mask=(rn[:, None] < N) & (k[None, :] < K), other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)
        ok = (rm[:, None] < M) & (rn[None, :] < N)
        out = Y + rm[:, None] * N + rn[None, :]
        if SPLIT == 1:
            acc += tl.load(B + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            tl.store(out, acc.to(Y.dtype.element_ty), mask=ok)
        else:
            tl.atomic_add(out, acc, mask=ok, sem="relaxed")


def tiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tile: Tile) -> torch.Tensor:
    """F.linear(x, weight, bias) for a 2-D x on the Triton GEMM with `tile`."""
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype) if tile.split == 1 else x.new_zeros(m, n, dtype=torch.float32)
    grid = (triton.cdiv(m, tile.block_m) * triton.cdiv(n, tile.block_n), tile.split)
    blocks = dict(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k)
    _tiled_gemm[grid](x, weight, bias, y, m, N=n, K=k, SPLIT=tile.split, **blocks, num_warps=tile.warps,
                      num_stages=tile.stages)  # fmt: skip
    return y if tile.split == 1 else (y + bias.float()).to(x.dtype)


def tiles(m: int, n: int, k: int, sms: int, quick: bool) -> list[Tile]:
    """Tilings whose grid is between a quarter wave and three waves of `sms`, no split deeper than its K steps."""
    grid = itertools.product((64, 128), (64, 128, 256), (64, 128), (1, 2, 3, 4), (4, 8), (3, 4))
    found = []
    for bm, bn, bk, split, warps, stages in grid:
        programs = -(-m // bm) * -(-n // bn) * split
        quick_skip = quick and (stages == 4 or (warps == 4) != (bm * bn <= 64 * 128) or bk == 128 and bn == 256)
        if quick_skip or not sms // 4 <= programs <= 3 * sms or -(-k // bk) < 4 * split:
            continue
        found.append(Tile(bm, bn, bk, split, warps, stages))
    return found


def bench_op(name: str, k: int, n: int, rows: int, quick: bool, device: torch.device) -> dict[str, Any]:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, k, generator=g, device=device, dtype=torch.bfloat16)
    weights = [torch.randn(n, k, generator=g, device=device, dtype=torch.bfloat16) * k**-0.5 for _ in range(COPIES)]
    bias = torch.randn(n, generator=g, device=device, dtype=torch.bfloat16) * 0.1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    with torch.no_grad():
        reference = F.linear(x, weights[0], bias).float()
        cublas_us = graph_time_us(rotating(lambda w: F.linear(x, w, bias), weights))
        results = []
        for tile in tiles(rows, n, k, sms, quick):
            try:
                diff = (tiled_linear(x, weights[0], bias, tile).float() - reference).abs().max().item()
                us = graph_time_us(rotating(lambda w, tile=tile: tiled_linear(x, w, bias, tile), weights))
            except triton.runtime.errors.OutOfResources:  # a tiling that does not fit in shared memory is skipped
                continue
            results.append((us, diff, tile))
    us, diff, tile = min(results, key=lambda r: r[0])
    tflop = 2 * rows * n * k / 1e12
    return dict(op=name, k=k, n=n, cublas_us=cublas_us, cublas_tflops=tflop / cublas_us * 1e6, best_us=us,
                best_tflops=tflop / us * 1e6, best=str(tile), best_diff=diff, tried=len(results))  # fmt: skip


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=512, help="token rows: 2 cameras x 256 patches at batch 1")
    p.add_argument("--quick", action="store_true", help="3 stages only, warps by tile size, fewer deep wide tiles")
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or triton is None:
        raise SystemExit("prefix_gemm: error: needs a CUDA device and Triton")
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, rows {args.rows}")
    print("\n| op | K -> N | cuBLAS (us) | TFLOP/s | best Triton tiling (us) | TFLOP/s | max abs diff | tiling | "
          "tried |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in args.ops:
        k, n, _ = OPS[name]
        r = bench_op(name, k, n, args.rows, args.quick, device)
        rows.append(r)
        print(f"| {name} | {k} -> {n} | {r['cublas_us']:.2f} | {r['cublas_tflops']:.0f} | {r['best_us']:.2f} | "
              f"{r['best_tflops']:.0f} | {r['best_diff']:.1e} | {r['best']} | {r['tried']} |", flush=True)  # fmt: skip
    per_layer = {key: sum(r[key] * OPS[r["op"]][2] for r in rows) for key in ("cublas_us", "best_us")}
    print(f"\nper SigLIP layer (the ops measured): cuBLAS {per_layer['cublas_us']:.1f} us, best tilings "
          f"{per_layer['best_us']:.1f} us; x {DEPTH} layers: "
          f"{(per_layer['cublas_us'] - per_layer['best_us']) * DEPTH / 1e3:.2f} ms to gain")  # fmt: skip
    write_json(args.out, rows)
    return rows


if __name__ == "__main__":
    main()
