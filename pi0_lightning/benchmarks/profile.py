"""Kernel profile of one PI0 `sample_actions` call on CUDA: where batch-1 latency goes.

    python -m pi0_lightning.benchmarks.profile [--batch 1] [--compile] [--tf32] [--rows 25] [--trace trace.json]

Full-size `pi0` in bf16 with random weights, the always-masked camera left out (as `LiberoPolicy` does), 10 Euler
steps; three warm-up calls (with `--compile`: compilation, and the action expert's stacked projections as in
`CUDAGraphSampler`), then one profiled call. Prints torch.profiler's table sorted by kernel time, and the number of
kernels and their total time; `--trace` also writes the call's Chrome trace (every kernel with its start and
duration, for a timeline or a per-phase breakdown).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from pi0_lightning.benchmarks.cpu import observation
from pi0_lightning.checkpoint import build_model
from pi0_lightning.model.config import PI0Config
from pi0_lightning.model.graphs import compile_blocks


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="pi0")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks first")
    p.add_argument("--tf32", action="store_true", help="float32 matmuls on TF32 (as the entry points set)")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--trace", type=Path, default=None, help="write the profiled call's Chrome trace (JSON) here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile: error: needs a CUDA device")
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    device = torch.device("cuda")
    cfg = PI0Config.variant(args.variant)
    model = build_model(cfg, device=device).apply_dtype_policy("bfloat16").eval()
    if args.compile:
        compile_blocks(model)
        model.llm.fuse_projections()  # as CUDAGraphSampler does
    obs = observation(cfg, args.batch).to(device)
    obs.images.pop("right_wrist_0_rgb")
    obs.image_masks.pop("right_wrist_0_rgb")
    noise = torch.randn(args.batch, cfg.action_horizon, cfg.action_dim, device=device)
    with torch.no_grad():
        for _ in range(3):
            model.sample_actions(obs, noise=noise, num_steps=10)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model.sample_actions(obs, noise=noise, num_steps=10)
            torch.cuda.synchronize()
    events = prof.key_averages()
    print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=100))
    kernels = [e for e in events if e.self_device_time_total > 0]
    total_ms = sum(e.self_device_time_total for e in kernels) / 1e3
    print(f"kernels: {sum(e.count for e in kernels)}, kernel time: {total_ms:.1f} ms")
    if args.trace is not None:
        args.trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(args.trace))


if __name__ == "__main__":
    main()
