"""The action expert's GEMMs of a denoising step at batch 1 (51 rows), each with what follows it: the compiled unfused
path (cuBLAS GEMM, then GeGLU or residual add as inductor emits them) against `model/small_gemm.py`'s fused Triton
GEMM, over a sweep of its tiling (how `small_gemm.tiling` was chosen).

    python -m pi0_lightning.benchmarks.skinny_gemm [--rows 51] [--quick] [--out skinny_gemm.json]

Ops: o with the residual add (2048 -> 1024), gate/up stacked with the GeGLU after (1024 -> 2 x 4096), down with the
residual add (4096 -> 1024), bf16 with float32 accumulation. Each variant is timed as a CUDA graph of 40 calls
rotating over 8 weight copies (more than the L2 cache holds), so weights come from memory as in the model.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pi0_lightning.benchmarks import COPIES, graph_time_us, rotating, write_json
from pi0_lightning.model import small_gemm

OPS = {  # name: (K, N, RMSNorm before, GeGLU after; else the residual add after)
    "q/k/v (norm before)": (1024, 2560, True, False),
    "o (+ residual)": (2048, 1024, False, False),
    "gate/up (norm before, GeGLU after)": (1024, 4096, True, True),
    "gate/up (GeGLU after; PI0.5)": (1024, 4096, False, True),
    "down (+ residual)": (4096, 1024, False, False),
}
PI05_ONLY = "gate/up (GeGLU after; PI0.5)"


def unfused(x, w, norm_weight, residual, geglu: bool) -> torch.Tensor:
    """The model's unfused arithmetic (gemma.RMSNorm, a Linear, then GeGLU or the residual add), to be compiled."""
    if norm_weight is not None:
        x32 = x.float()
        x = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + norm_weight)).to(x.dtype)
    y = F.linear(x, w)
    if geglu:
        gate, up = y.chunk(2, -1)
        y = F.gelu(gate, approximate="tanh") * up
    return y + residual if residual is not None else y


def tilings(n: int, k: int, quick: bool) -> list[small_gemm.Tiling]:
    grid = itertools.product((16, 32, 64, 128), (64, 128, 256), (1, 2, 4, 8), (4, 8), (2, 3, 4, 5))
    found = []
    for block_n, block_k, split, warps, stages in grid:
        programs = -(-n // block_n) * split
        skip_quick = quick and (block_n in (16, 128) or block_k == 64 or warps == 8 or stages in (2, 5))
        if k % (split * block_k) or not 16 <= programs <= 640 or skip_quick:
            continue
        found.append(small_gemm.Tiling(block_n, block_k, split, warps, stages))
    return found


def bench_op(
    name: str, k: int, n: int, norm: bool, geglu: bool, rows: int, quick: bool, device: torch.device
) -> dict[str, Any]:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, rows, k, generator=g, device=device, dtype=torch.bfloat16)
    out_n = 2 * n if geglu else n
    weights = [torch.randn(out_n, k, generator=g, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(COPIES)]
    residual = None if geglu or norm else torch.randn(1, rows, n, generator=g, device=device, dtype=torch.bfloat16)
    norm_weight = torch.randn(k, generator=g, device=device) * 0.1 if norm else None
    # the fused GEMM reads the weights with the norm's (1 + w) folded in (FusedWeight's norm_weight)
    folded = [(w.float() * (1.0 + norm_weight)).to(w.dtype) for w in weights] if norm else weights
    compiled = torch.compile(unfused, dynamic=False)
    with torch.no_grad():
        reference = unfused(x, weights[0], norm_weight, residual, geglu).float()
        unfused_us = graph_time_us(rotating(lambda w: compiled(x, w, norm_weight, residual, geglu), weights))
        eps = 1e-6 if norm else None
        chosen = small_gemm.tiling(n, k, geglu, norm, device)
        results = []
        for tile in [chosen, *(t for t in tilings(n, k, quick) if t != chosen)]:

            def fused(w, tile=tile):
                return small_gemm.linear(x, w, rms_eps=eps, geglu=geglu, residual=residual, tile=tile)

            try:
                diff = (fused(folded[0]).float() - reference).abs().max().item()
                us = graph_time_us(rotating(fused, folded))
            except small_gemm.triton.runtime.errors.OutOfResources:  # a tiling that does not fit is skipped
                continue
            results.append((us, diff, tile))
    if results[0][2] != chosen:
        raise RuntimeError(f"skinny_gemm: the chosen tiling {chosen} does not run for {name}")
    best = min(results, key=lambda r: r[0])
    mbytes = out_n * k * 2 / 1e6
    return dict(op=name, k=k, n=n, weight_mb=mbytes, unfused_us=unfused_us, chosen_us=results[0][0], chosen=str(chosen),
                chosen_diff=results[0][1], best_us=best[0], best=str(best[2]), tried=len(results))  # fmt: skip


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=51, help="GEMM rows: 51 action tokens per batch element")
    p.add_argument("--quick", action="store_true", help="sweep 32-64 columns, 128-256 deep, 4 warps, 3-4 stages only")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or small_gemm.triton is None:
        raise SystemExit("skinny_gemm: error: needs a CUDA device and Triton")
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, rows {args.rows}")
    print("\n| op | weights (MB) | unfused, compiled (us) | fused, chosen tiling (us) | GB/s | max abs diff | "
          "best in sweep (us) | best tiling | tilings tried |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name, (k, n, norm, geglu) in OPS.items():
        r = bench_op(name, k, n, norm, geglu, args.rows, args.quick, device)
        rows.append(r)
        print(f"| {r['op']} | {r['weight_mb']:.1f} | {r['unfused_us']:.2f} | {r['chosen_us']:.2f} | "
              f"{r['weight_mb'] / r['chosen_us'] * 1e3:.0f} | {r['chosen_diff']:.1e} | {r['best_us']:.2f} | "
              f"{r['best']} | {r['tried']} |", flush=True)  # fmt: skip
    total = {key: sum(r[key] for r in rows if r["op"] != PI05_ONLY) for key in ("unfused_us", "chosen_us", "best_us")}
    print(f"\nper PI0 layer step: unfused {total['unfused_us']:.1f} us, fused (chosen) {total['chosen_us']:.1f} us, "
          f"fused (best) {total['best_us']:.1f} us; x 180 layer steps at batch 1: "
          f"{(total['unfused_us'] - total['chosen_us']) * 0.18:.2f} ms saved (chosen)")  # fmt: skip
    write_json(args.out, rows)
    return rows


if __name__ == "__main__":
    main()
