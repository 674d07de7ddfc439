"""The action expert's GEMMs at batch 1 (51 rows): cuBLAS against a plain Triton GEMM, over a sweep of its tiling.

    python -m pi0_lightning.benchmarks.skinny_gemm [--rows 51] [--out skinny_gemm.json]

This answers whether a hand-written GEMM, into which norms and activations could later be fused, would be a faster
base for the denoising steps than cuBLAS (measured on an H100: no, it only matches it; BENCHMARKS.md). Shapes are the
stacked q/k/v (1024 -> 2560), o (2048 -> 1024), stacked gate/up (1024 -> 8192) and down (4096 -> 1024) projections,
bf16 with float32 accumulation. Each variant is timed as a CUDA graph of 40 calls rotating over 8 weight copies (more
than the L2 cache holds), so weights come from memory as in the model. The gate/up row also times a Triton GEMM with
the GeGLU (`gelu_tanh(gate) * up`) fused into its epilogue against cuBLAS followed by the compiled activation.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pi0_lightning.benchmarks import graph_time_us, write_json
from pi0_lightning.model.kernels import triton

SHAPES = {"qkv": (1024, 2560), "o": (2048, 1024), "gate_up": (1024, 8192), "down": (4096, 1024)}
COPIES = 8
BLOCK_M = 64

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _linear(
        X, W, Y, M, N, K, sxm, swn, sym,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GEGLU: tl.constexpr,
    ):  # fmt: skip
        # Y = X @ W.T (W in nn.Linear's (out, in) layout); with GEGLU, W holds [gate; up] and Y = gelu(gate) * up
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(X + rm[:, None] * sxm + (k0 + rk)[None, :], mask=rm[:, None] < M, other=0.0)
            acc = tl.dot(x, tl.trans(tl.load(W + rn[:, None] * swn + (k0 + rk)[None, :])), acc)
            if GEGLU:
                acc_up = tl.dot(x, tl.trans(tl.load(W + (rn + N)[:, None] * swn + (k0 + rk)[None, :])), acc_up)
        if GEGLU:  # as the unfused path: both GEMM outputs rounded to bf16, then tanh-GELU, rounded, times up
            gate = acc.to(tl.bfloat16).to(tl.float32)
            inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
            gelu = (gate * tl.sigmoid(2.0 * inner)).to(tl.bfloat16).to(tl.float32)  # 0.5 (1 + tanh u) = sigmoid(2u)
            acc = gelu * acc_up.to(tl.bfloat16).to(tl.float32)
        tl.store(Y + rm[:, None] * sym + rn[None, :], acc.to(Y.dtype.element_ty), mask=rm[:, None] < M)


def triton_linear(x, w, out, block_n: int, block_k: int, stages: int, geglu: bool = False) -> torch.Tensor:
    m, k = x.shape
    n = out.shape[1]
    _linear[(n // block_n, triton.cdiv(m, BLOCK_M))](
        x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, GEGLU=geglu, num_warps=4, num_stages=stages,
    )  # fmt: skip
    return out


def rotating(fn: Callable, weights: list[torch.Tensor], *args: Any) -> Callable[[int], object]:
    """Call i of a timed graph uses weight copy i mod COPIES."""
    return lambda i: fn(weights[i % COPIES], *args)


def sweep(x, weights, n: int, reference: torch.Tensor, geglu: bool) -> tuple[float, float, dict[str, int]]:
    """Fastest (us, max abs diff to reference, tiling) over the Triton tilings that fit."""
    k = x.shape[1]
    out = torch.empty(x.shape[0], n, device=x.device, dtype=x.dtype)
    best = None
    for block_n, block_k, stages in itertools.product((16, 32, 64, 128), (64, 128, 256), (3, 4)):
        if n % block_n or k % block_k:
            continue
        try:
            diff = (triton_linear(x, weights[0], out, block_n, block_k, stages, geglu).float() - reference).abs().max()
            us = graph_time_us(rotating(partial(triton_linear, x), weights, out, block_n, block_k, stages, geglu))
        except triton.runtime.errors.OutOfResources:
            continue
        if best is None or us < best[0]:
            best = (us, diff.item(), dict(block_n=block_n, block_k=block_k, stages=stages))
    return best


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=51, help="GEMM rows: 51 action tokens per batch element")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or triton is None:
        raise SystemExit("skinny_gemm: error: needs a CUDA device and Triton")
    device = torch.device("cuda")
    geglu = torch.compile(lambda y: F.gelu(y[:, : y.shape[1] // 2], approximate="tanh") * y[:, y.shape[1] // 2 :])
    rows = []
    for name, (k, n) in SHAPES.items():
        x = torch.randn(args.rows, k, device=device, dtype=torch.bfloat16)
        weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(COPIES)]
        with torch.no_grad():
            reference = F.linear(x, weights[0])
            cublas_us = graph_time_us(rotating(partial(F.linear, x), weights))
            us, diff, tile = sweep(x, weights, n, reference.float(), geglu=False)
            rows.append(dict(op=name, k=k, n=n, cublas_us=cublas_us, triton_us=us, max_abs_diff=diff, tiling=tile))
            if name == "gate_up":
                cublas_us = graph_time_us(rotating(lambda w, x=x: geglu(F.linear(x, w)), weights))
                us, diff, tile = sweep(x, weights, n // 2, geglu(reference).float(), geglu=True)
                rows.append(dict(op="gate_up + GeGLU", k=k, n=n, cublas_us=cublas_us, triton_us=us, max_abs_diff=diff,
                                 tiling=tile))  # fmt: skip
    print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, rows {args.rows}")
    print("\n| op | K -> N | cuBLAS (us) | GB/s | Triton, best tiling (us) | GB/s | max abs diff | tiling |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        gbytes = r["n"] * r["k"] * 2 / 1e9
        print(f"| {r['op']} | {r['k']} -> {r['n']} | {r['cublas_us']:.2f} | {gbytes / r['cublas_us'] * 1e6:.0f} | "
              f"{r['triton_us']:.2f} | {gbytes / r['triton_us'] * 1e6:.0f} | {r['max_abs_diff']:.1e} | "
              f"{r['tiling']} |")  # fmt: skip
    write_json(args.out, rows)
    return rows


if __name__ == "__main__":
    main()
