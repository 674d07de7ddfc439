"""Kernel profile of one PI0 `sample_actions` call on CUDA: where batch-1 latency goes.

    python -m pi0_lightning.benchmarks.profile [--batch 1] [--compile] [--tf32] [--rows 25] [--trace trace.json]

Full-size `pi0` in bf16 with random weights, the always-masked camera left out (as `LiberoPolicy` does), 10 Euler
steps; three warm-up calls (with `--compile`: compilation, and the action expert's stacked projections as in
`CUDAGraphSampler`), then one profiled call. Prints torch.profiler's table sorted by kernel time, and the number of
kernels and their total time, then the same split into the prefix pass and the denoising steps (the latter also per
layer step: depth x 10 of them). The split is at the first fused few-row GEMM (`SUFFIX_MARKER`), which only the
denoising steps run; with it switched off, at the first attention kernel after the prefix's `depth` ones
(`ATTENTION_KERNEL`), so that the kernels of the first layer step before its attention count as prefix. `--trace`
keeps the call's Chrome trace (every kernel with start and duration).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from pi0_lightning.benchmarks.cpu import observation
from pi0_lightning.checkpoint import build_model
from pi0_lightning.model.config import PI0Config
from pi0_lightning.model.speed import SpeedConfig, apply_speed_paths

STEPS = 10
SUFFIX_MARKER = "_small_linear"
"""The kernel that only the denoising steps launch: the first one starts the suffix."""
ATTENTION_KERNEL = "_partial_attention"
"""The attention kernel, one per layer in the prefix pass (at small batch) and in every denoising step."""

Kernel = tuple[str, float, float]  # name, start (us), duration (us)


def kernel_timeline(trace: Path) -> list[Kernel]:
    """The GPU kernels of a Chrome trace written by torch.profiler, in start order."""
    events = json.loads(trace.read_text())["traceEvents"]
    return sorted(((e["name"], e["ts"], e["dur"]) for e in events if e.get("cat") == "kernel"), key=lambda k: k[1])


def phase_breakdown(kernels: list[Kernel], layer_steps: int, rows: int = 8) -> str:
    """Markdown: kernel count and time of the prefix pass and of the denoising steps, and the suffix's largest
    kernels per layer step."""
    start = next((i for i, k in enumerate(kernels) if k[0].startswith(SUFFIX_MARKER)), None)
    if start is None:
        attention = [i for i, k in enumerate(kernels) if k[0].startswith(ATTENTION_KERNEL)]
        depth = layer_steps // STEPS
        start = attention[depth] if len(attention) > depth else len(kernels)
    lines = ["| phase | kernels | kernel time (ms) |", "|---|---|---|"]
    for phase, part in (("prefix", kernels[:start]), ("denoising steps", kernels[start:])):
        lines.append(f"| {phase} | {len(part)} | {sum(k[2] for k in part) / 1e3:.2f} |")
    per_name: dict[str, list[float]] = defaultdict(list)
    for name, _, dur in kernels[start:]:
        per_name[name].append(dur)
    lines += ["", "| denoising-step kernel | calls | us per call | us per layer step |", "|---|---|---|---|"]
    for name, durs in sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:rows]:
        lines.append(f"| {name[:80]} | {len(durs)} | {sum(durs) / len(durs):.2f} | {sum(durs) / layer_steps:.2f} |")
    return "\n".join(lines)


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
    # the inference paths (kernels, stacked weights), compiled blocks with --compile, as the rollout policy runs them
    apply_speed_paths(model, SpeedConfig(compile=args.compile))
    obs = observation(cfg, args.batch).to(device)
    obs.images.pop("right_wrist_0_rgb")
    obs.image_masks.pop("right_wrist_0_rgb")
    noise = torch.randn(args.batch, cfg.action_horizon, cfg.action_dim, device=device)
    with torch.no_grad():
        for _ in range(3):
            model.sample_actions(obs, noise=noise, num_steps=STEPS)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model.sample_actions(obs, noise=noise, num_steps=STEPS)
            torch.cuda.synchronize()
    events = prof.key_averages()
    print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=100))
    kernels = [e for e in events if e.self_device_time_total > 0]
    total_ms = sum(e.self_device_time_total for e in kernels) / 1e3
    print(f"kernels: {sum(e.count for e in kernels)}, kernel time: {total_ms:.1f} ms")
    with tempfile.TemporaryDirectory() as tmp:
        trace = args.trace or Path(tmp) / "trace.json"
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
        print("\n" + phase_breakdown(kernel_timeline(trace), layer_steps=cfg.action_expert.depth * STEPS))


if __name__ == "__main__":
    main()
