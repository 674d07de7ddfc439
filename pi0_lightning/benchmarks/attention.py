"""The denoising steps' attention on CUDA: the Triton kernel (`model/kernels.py`) against the compiled matmul path,
and a sweep over the kernel's tiling (how its `tiling()` table was chosen).

    python -m pi0_lightning.benchmarks.attention [--batches 1 8 16 32 64] [--sweep] [--out attention.json]

PI0's shape per layer step: 8 query heads x 51 action tokens against one key/value head of a 560-token prefix cache
plus the 51 new tokens, head_dim 256, bf16. Each variant is timed as one CUDA graph of 40 calls that rotates over 18
layers' worth of keys and values, so the cache comes from memory as in the model; the median of 15 replays is
reported per call. The matmul path is `gemma.attention` with the kernel switched off, concatenation included,
torch.compiled as the model's blocks are.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pi0_lightning.benchmarks import graph_time_us, write_json
from pi0_lightning.model import gemma, kernels

HEADS, KV_HEADS, TOKENS, PREFIX, HEAD_DIM = 8, 1, 51, 560, 256
LAYERS = 18


def inputs(batch: int, device: torch.device) -> tuple[torch.Tensor, list, torch.Tensor]:
    """Queries, per layer (cache K, cache V, new K, new V), and the additive mask (some prefix keys masked)."""
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device, dtype=torch.bfloat16)

    q = randn(batch, TOKENS, HEADS, HEAD_DIM).transpose(1, 2)  # the model's layout: a transposed view
    layers = [
        (randn(batch, KV_HEADS, PREFIX, HEAD_DIM), randn(batch, KV_HEADS, PREFIX, HEAD_DIM))
        + (randn(batch, KV_HEADS, TOKENS, HEAD_DIM), randn(batch, KV_HEADS, TOKENS, HEAD_DIM))
        for _ in range(LAYERS)
    ]
    allowed = torch.ones(batch, TOKENS, PREFIX + TOKENS, dtype=torch.bool, device=device)
    allowed[:, :, 500:PREFIX] = False  # padded prompt tokens
    return q, layers, gemma.additive_mask(allowed, torch.bfloat16)


def sweep_tilings(batch: int) -> list[kernels.Tiling]:
    small = itertools.product((16, 32), (32, 64), (64, 128), (4, 8), (2, 3))
    large = itertools.product((32, 64, 128), (32, 64), (128, 256), (4, 8), (2, 3))
    return [kernels.Tiling(*t) for t in (small if batch <= 4 else large)]


def bench(batch: int, sweep: bool, device: torch.device) -> dict[str, Any]:
    q, layers, mask = inputs(batch, device)
    limit = torch.cuda.get_device_properties(device).shared_memory_per_block_optin

    def matmul_path(q, k, v, k_new, v_new, mask):
        return gemma.attention(q, k_new, v_new, mask, KV_HEADS, (k, v))

    compiled = torch.compile(matmul_path, dynamic=False)
    with kernels.disabled(), torch.no_grad():
        reference = matmul_path(q, *layers[0], mask).float()
        matmul_us = graph_time_us(lambda i: compiled(q, *layers[i % LAYERS], mask))

    def kernel_us(tile: kernels.Tiling) -> tuple[float, float]:
        def call(i: int) -> torch.Tensor:
            k, v, k_new, v_new = layers[i % LAYERS]
            return kernels.cached_attention(q, k, v, mask, KV_HEADS, k_new, v_new, tile=tile)

        with torch.no_grad():
            diff = (call(0).float() - reference).abs().max().item()
            return graph_time_us(call), diff

    chosen = kernels.tiling(batch * KV_HEADS, HEAD_DIM, device)
    row: dict[str, Any] = {"batch": batch, "matmul_us": matmul_us, "tiling": chosen and vars(chosen)}
    if chosen is not None:
        row["kernel_us"], row["max_abs_diff"] = kernel_us(chosen)
    if sweep:
        tried = [(*kernel_us(t), t) for t in sweep_tilings(batch) if t.shared_memory(HEAD_DIM) <= limit]
        best_us, best_diff, best = min(tried, key=lambda r: r[0])
        row.update(best_us=best_us, best_tiling=vars(best), tried=len(tried))
    return row


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    p.add_argument("--sweep", action="store_true", help="also time every tiling of the sweep (a few minutes)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or kernels.triton is None:
        raise SystemExit("attention: error: needs a CUDA device and Triton")
    device = torch.device("cuda")
    rows = [bench(b, args.sweep, device) for b in args.batches]
    print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    print(
        "\n| batch | matmul path, compiled (us) | kernel (us) | tiling | max abs diff | sweep best (us) | its tiling |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        used = r["batch"] * KV_HEADS <= kernels.MAX_PAIRS and r["tiling"] is not None
        kernel = f"{r['kernel_us']:.1f}" + ("" if used else " (not used)") if "kernel_us" in r else "-"
        diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "-"
        best = f"{r['best_us']:.1f}" if "best_us" in r else "-"
        print(f"| {r['batch']} | {r['matmul_us']:.1f} | {kernel} | {r['tiling']} | {diff} | {best} | "
              f"{r.get('best_tiling', '-')} |")  # fmt: skip
    write_json(args.out, rows)
    return {"rows": rows}


if __name__ == "__main__":
    main()
