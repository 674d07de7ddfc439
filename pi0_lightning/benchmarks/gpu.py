"""GPU benchmark of PI0 in bfloat16: matmul peak, `sample_actions` latency/throughput, RL training step time/memory.

Weights are random (speed does not depend on their values); the model is built directly on the device and cast by
`apply_dtype_policy("bfloat16")`, which keeps openpi's float32 islands. What is measured:

1. the device's bf16 matmul peak: median TFLOP/s of an 8192^3 matmul over 20 runs, the denominator of every
   "fraction of peak" below;
2. inference: `sample_actions` (10 Euler steps, action horizon 50) on 3 cameras, the third masked, and a 48-token
   prompt with 20 valid tokens: median latency over `--repeats` runs after 3 warm-up runs, chunks/s, and the achieved
   TFLOP/s from the analytic matmul count `sample_flops`, as a fraction of the measured peak;
3. training: one optimizer step (forward, backward, AdamW, fused on CUDA) of the two-branch CFG loss
   (`rl.cfg.cfg_loss`; chunks padded to 50 actions, the first 5 executed) for full fine-tuning and for the action
   expert only, with and without activation checkpointing: median step time over repeats/4 steps (5 by default)
   after 2 warm-up steps, and peak allocated memory, reset per configuration (an out-of-memory configuration reads
   "OOM"); plus the single-branch flow-matching step (`model(obs, actions).mean()`, full fine-tuning, batch 16 or
   `--batch-single`) for the CFG/single step-time ratio.

Times come from CUDA events. `--device cpu` (for smoke tests with a tiny variant) times with time.perf_counter after
a single warm-up run and skips the peak and the fractions (n/a). Tables are printed as markdown and written as JSON
to `--out` if given.

    python -m pi0_lightning.benchmarks.gpu [--variant pi0] [--batches-infer 1 8 32 64] [--batches-train 8 16 32]
        [--repeats 20] [--skip-infer] [--skip-train] [--out gpu.json] [--device cuda]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from pi0_lightning.benchmarks import write_json
from pi0_lightning.benchmarks.cpu import observation
from pi0_lightning.checkpoint import build_model
from pi0_lightning.model.config import GemmaConfig, PI0Config
from pi0_lightning.model.pi0 import PI0
from pi0_lightning.model.speed import (
    SpeedConfig,
    apply_speed_paths,
    compile_blocks,
    disabled,
    set_activation_checkpointing,
)
from pi0_lightning.rl.cfg import CFGLossConfig, cfg_loss

Row = dict[str, Any]
Column = tuple[str, str, str]  # row key, header, format spec
NUM_STEPS = 10
EXECUTED_ROWS = 5
OOM = "OOM"


def _gemma_token_flops(g: GemmaConfig, keys: int) -> int:
    """Matmul FLOPs of one token through one layer of a Gemma expert whose queries attend to `keys` keys."""
    q, kv = g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim
    projections = 2 * g.width * (2 * q + 2 * kv)  # q and o, k and v
    mlp = 2 * 3 * g.width * g.mlp_dim  # GeGLU gate, up, down
    attention = 2 * 2 * keys * q  # scores and weighted values over all heads
    return projections + mlp + attention


def sample_flops(config: PI0Config, batch: int, num_steps: int, prompt_len: int = 48, cameras: int = 3) -> int:
    """Analytic FLOPs (2 per multiply-add) of one `sample_actions` call, counting matmuls only.

    SigLIP on every camera (stem, per token q/k/v/o + MLP + attention scores/values over the image's tokens, head),
    one PaliGemma pass over the prefix (cameras * patches + prompt_len tokens, attending to the whole prefix), and
    `num_steps` action-expert passes over the suffix attending to prefix + suffix, with the action/state/time
    projections. Norms, RoPE, softmax, embeddings lookups and elementwise ops are not counted. Masked cameras and
    padded prompt tokens are counted: the current model computes them (they are only masked out of attention).
    """
    v, pg, ae = config.vision, config.paligemma, config.action_expert
    patches = v.num_patches
    vit_layer = 2 * 4 * v.width**2 + 2 * 2 * v.width * v.mlp_dim + 2 * 2 * patches * v.width
    vit_token = 2 * 3 * v.patch_size**2 * v.width + v.depth * vit_layer + 2 * v.width * pg.width
    vision = cameras * patches * vit_token
    prefix_len = cameras * patches + prompt_len
    prefix = prefix_len * pg.depth * _gemma_token_flops(pg, prefix_len)
    h, w, d = config.action_horizon, ae.width, config.action_dim
    suffix_len = h + (0 if config.pi05 else 1)
    heads = h * 2 * 2 * d * w  # action_in_proj, action_out_proj
    if config.pi05:  # per sample: time MLP and the adaptive-RMSNorm denses (two per layer and the final norm)
        heads += 2 * 2 * w * w + (2 * ae.depth + 1) * 2 * w * 3 * w
    else:  # state_proj, action_time_mlp_in (2w -> w) and _out (w -> w)
        heads += 2 * d * w + h * 2 * 3 * w * w
    step = suffix_len * ae.depth * _gemma_token_flops(ae, prefix_len + suffix_len) + heads
    return batch * (vision + prefix + num_steps * step)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of `fn` in ms: CUDA events on a GPU, time.perf_counter otherwise."""
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def warmup(device: torch.device, runs: int) -> int:
    """Warm-up runs: `runs` on a GPU, one on the CPU (smoke tests only)."""
    return runs if device.type == "cuda" else 1


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def matmul_peak_tflops(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, device, warmup=3, repeats=repeats)
    return 2 * n**3 / (ms * 1e-3) / 1e12


INFER_MODES = ["eager", "drop-cam", "graph", "compile", "compile-unfused", "compile-matmul-attn", "compile-cublas"]


def speed_config(mode: str) -> SpeedConfig:
    """The speed paths of an inference mode (see `bench_inference`)."""
    plain = mode in ("compile-unfused", "compile-matmul-attn")
    return SpeedConfig(
        attention_kernel=not plain,
        small_gemm=not plain and mode != "compile-cublas",
        fused_projections=mode not in ("eager", "drop-cam", "compile-unfused"),
        compile=mode.startswith("compile"),
        cuda_graphs=mode not in ("eager", "drop-cam"),
    )


def bench_inference(
    model: PI0,
    device: torch.device,
    batches: Sequence[int],
    repeats: int,
    peak: float | None,
    mode: str = "eager",
) -> list[Row]:
    """mode: eager; drop-cam (the always-masked camera left out, as LiberoPolicy does); graph (drop-cam replayed
    as one CUDA graph, with the action expert's stacked q/k/v and gate/up projections; capture time and the max
    difference to plain eager sampling are reported); compile (graph, with every transformer block torch.compiled
    first; capture time includes compilation). For A/B runs: compile-unfused (no stacked projections and no Triton
    kernels), compile-matmul-attn (stacked projections, reference attention, no fused GEMMs) and compile-cublas
    (cuBLAS and separate elementwise kernels instead of `small_gemm`'s fused GEMMs); `speed_config` gives each
    mode's speed paths. Off CUDA every mode samples eagerly."""
    cfg = model.config
    model.eval()
    config = speed_config(mode) if device.type == "cuda" else SpeedConfig(fused_projections=False)
    apply_speed_paths(model, config)
    rows = []
    for b in batches:
        obs = observation(cfg, b).to(device)
        cameras = cfg.num_cameras
        if mode != "eager":
            obs.images.pop("right_wrist_0_rgb")
            obs.image_masks.pop("right_wrist_0_rgb")
            cameras -= 1
        flops = sample_flops(cfg, b, NUM_STEPS, cfg.max_token_len, cameras)
        row: Row = {"mode": mode, "batch": b, "tflop_per_call": flops / 1e12}
        noise = torch.randn(b, cfg.action_horizon, cfg.action_dim, device=device)
        sample = partial(model.sample_actions, obs, noise=noise, num_steps=NUM_STEPS)
        if config.cuda_graphs:
            with disabled(model):
                reference = sample()  # plain eager: separate projections, reference attention
            graphed = apply_speed_paths(model, config)  # a new runner: its first call captures
            start = time.perf_counter()
            out = graphed(obs, noise, NUM_STEPS)
            torch.cuda.synchronize(device)
            row["capture_s"] = time.perf_counter() - start
            row["max_abs_diff_vs_eager"] = (out - reference).abs().max().item()
            sample = partial(graphed, obs, noise, NUM_STEPS)
        try:
            ms = time_ms(sample, device, warmup(device, 3), repeats)
        except torch.cuda.OutOfMemoryError:
            row.update(latency_ms=OOM, chunks_per_s=OOM, tflops=OOM, frac_peak=OOM)
        else:
            tflops = flops / (ms * 1e-3) / 1e12
            frac = tflops / peak if peak else None
            row.update(latency_ms=ms, chunks_per_s=b / (ms * 1e-3), tflops=tflops, frac_peak=frac)
        rows.append(row)
        del obs
        free_memory(device)
        print(markdown(INFER_COLUMNS, rows[-1:], header=False), flush=True)
    return rows


def set_trainable(model: PI0, mode: str) -> None:
    """full: everything; action_expert: freeze SigLIP and PaliGemma (as lit/module.py's `action_expert` mode)."""
    model.requires_grad_(True)
    if mode == "action_expert":
        model.vision.requires_grad_(False)
        model.llm.requires_grad_(False)
        for layer in model.llm.layers:
            layer.experts[1].requires_grad_(True)
        model.llm.norms[1].requires_grad_(True)


def train_step_ms(model: PI0, device: torch.device, batch: int, loss: str, warmup: int, repeats: int) -> float:
    """Median time of one optimizer step; everything it allocates is released when it returns or raises."""
    cfg = model.config
    obs = observation(cfg, batch).to(device)
    actions = torch.randn(batch, cfg.action_horizon, cfg.action_dim, device=device)
    action_mask = (torch.arange(cfg.action_horizon, device=device) < EXECUTED_ROWS)[None].expand(batch, -1)
    advantages = torch.randn(batch, device=device)
    valid = torch.ones(batch, dtype=torch.bool, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")

    def step() -> None:
        if loss == "cfg":
            value, _ = cfg_loss(model, obs, actions, action_mask, advantages, valid, CFGLossConfig())
        else:
            value = model(obs, actions).mean()
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return time_ms(step, device, warmup, repeats)


def apply_checkpointing(model: PI0, spec: str) -> None:
    """off; on (every Gemma layer and SigLIP block, as `activation_checkpointing: true`); llmN (SigLIP blocks and
    the first N Gemma layers)."""
    if spec not in ("off", "on") and not (spec.startswith("llm") and spec[3:].isdigit()):
        raise ValueError(f"checkpointing must be off, on or llmN, got {spec!r}")
    set_activation_checkpointing(model, spec != "off", int(spec[3:]) if spec.startswith("llm") else None)


def bench_training(
    model: PI0,
    device: torch.device,
    batches: Sequence[int],
    batch_single: int,
    repeats: int,
    trainables: Sequence[str] = ("full", "action_expert"),
    checkpointing: Sequence[str] = ("off", "on"),
) -> tuple[list[Row], list[Row]]:
    model.train()
    configs = [("cfg", mode, ckpt, b) for mode in trainables for ckpt in checkpointing for b in batches]
    configs += [("single", "full", ckpt, batch_single) for ckpt in ("off", "on")]
    rows = []
    for loss, mode, ckpt, b in configs:
        set_trainable(model, mode)
        apply_checkpointing(model, ckpt)
        model.zero_grad(set_to_none=True)
        free_memory(device)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
        row: Row = {"loss": loss, "mode": mode, "ckpt": ckpt, "batch": b, "trainable_m": trainable}
        try:
            ms = train_step_ms(model, device, b, loss, warmup(device, 2), max(1, math.ceil(repeats / 4)))
        except torch.cuda.OutOfMemoryError:
            row.update(step_ms=OOM, samples_per_s=OOM, peak_gib=OOM)
        else:
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            row.update(step_ms=ms, samples_per_s=b / (ms * 1e-3), peak_gib=peak)
        rows.append(row)
        model.zero_grad(set_to_none=True)
        free_memory(device)
        print(markdown(TRAIN_COLUMNS, rows[-1:], header=False), flush=True)
    set_trainable(model, "full")
    apply_checkpointing(model, "off")
    ratios = []
    for ckpt in ("off", "on"):
        key = ("full", ckpt, batch_single)
        found = {r["loss"]: r["step_ms"] for r in rows if (r["mode"], r["ckpt"], r["batch"]) == key}
        cfg_ms, single_ms = found.get("cfg"), found.get("single")
        ratio = cfg_ms / single_ms if isinstance(cfg_ms, float) and isinstance(single_ms, float) else None
        ratios.append({"ckpt": ckpt, "batch": batch_single, "cfg_ms": cfg_ms, "single_ms": single_ms, "ratio": ratio})
    return rows, ratios


INFER_COLUMNS: list[Column] = [
    ("mode", "mode", "s"),
    ("batch", "batch", "d"),
    ("latency_ms", "latency (ms, median)", ".1f"),
    ("chunks_per_s", "chunks/s", ".1f"),
    ("tflop_per_call", "TFLOP per call", ".2f"),
    ("tflops", "achieved TFLOP/s", ".1f"),
    ("frac_peak", "fraction of peak", ".3f"),
    ("capture_s", "graph capture (s)", ".1f"),
    ("max_abs_diff_vs_eager", "max abs diff vs eager", ".1e"),
]
TRAIN_COLUMNS: list[Column] = [
    ("loss", "loss", "s"),
    ("mode", "trainable", "s"),
    ("ckpt", "act. ckpt", "s"),
    ("batch", "batch", "d"),
    ("trainable_m", "trainable params (M)", ".1f"),
    ("step_ms", "step (ms, median)", ".1f"),
    ("samples_per_s", "samples/s", ".1f"),
    ("peak_gib", "peak mem (GiB)", ".2f"),
]
RATIO_COLUMNS: list[Column] = [
    ("ckpt", "act. ckpt", "s"),
    ("batch", "batch", "d"),
    ("cfg_ms", "CFG two-branch step (ms)", ".1f"),
    ("single_ms", "single-branch step (ms)", ".1f"),
    ("ratio", "CFG / single", ".2f"),
]


def markdown(columns: Sequence[Column], rows: Sequence[Row], header: bool = True) -> str:
    def cell(value: Any, fmt: str) -> str:
        if value is None:
            return "n/a"
        return value if isinstance(value, str) else format(value, fmt)

    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)] if header else []
    lines += ["| " + " | ".join(cell(r.get(k), f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join(lines)


def device_info(device: torch.device) -> Row:
    info: Row = {"torch": torch.__version__, "date": datetime.date.today().isoformat()}
    if device.type == "cuda":
        info.update(device=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    else:
        info.update(device=f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)")
    return info


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="pi0")
    parser.add_argument("--batches-infer", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--batches-train", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument(
        "--batch-single", type=int, help="batch of the single-branch step (16 if trained, else the first train batch)"
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed inference runs (training steps: n/4)")
    parser.add_argument(
        "--infer-modes",
        nargs="+",
        default=["eager"],
        choices=INFER_MODES,
    )
    parser.add_argument("--trainables", nargs="+", default=["full", "action_expert"], choices=["full", "action_expert"])
    parser.add_argument(
        "--checkpointing", nargs="+", default=["off", "on"], help="off, on, or llmN (SigLIP + the first N layers)"
    )
    parser.add_argument(
        "--compile-train", action="store_true", help="torch.compile the transformer blocks before the training steps"
    )
    parser.add_argument("--skip-infer", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--out", type=Path, help="also write the tables as JSON here")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    if args.batch_single is None:
        args.batch_single = 16 if 16 in args.batches_train else args.batches_train[0]
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:  # as the entry points do (`graphs.use_tf32`): float32 islands on TF32, like XLA's default
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)

    info = device_info(device)
    print(f"device: {info['device']}, torch {info['torch']}, CUDA {info.get('cuda', 'n/a')}, {info['date']}")
    peak = matmul_peak_tflops(device) if cuda else None
    print(f"measured bf16 matmul peak (8192^3, median of 20): {peak:.1f} TFLOP/s" if peak else "matmul peak: n/a")
    results: dict[str, Any] = {"device": info, "variant": args.variant, "peak_tflops": peak}

    config = PI0Config.variant(args.variant)
    model = build_model(config, device).add_cfg_conditions(2).apply_dtype_policy("bfloat16")
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.variant}, {params / 1e6:.1f} M parameters, bfloat16 with float32 islands")
    results["params_m"] = params / 1e6

    if not args.skip_infer:
        print(f"\n### sample_actions ({NUM_STEPS} steps, horizon {config.action_horizon}, 3rd camera masked)\n")
        print(markdown(INFER_COLUMNS, []), flush=True)
        results["inference"] = []
        for mode in args.infer_modes:
            results["inference"] += bench_inference(model, device, args.batches_infer, args.repeats, peak, mode)
    if not args.skip_train:
        print(f"\n### training step (AdamW, chunks padded to {config.action_horizon}, {EXECUTED_ROWS} executed)\n")
        print(markdown(TRAIN_COLUMNS, []), flush=True)
        if args.compile_train:
            compile_blocks(model)
        rows, ratios = bench_training(
            model, device, args.batches_train, args.batch_single, args.repeats, args.trainables, args.checkpointing
        )
        print("\n### CFG two-branch vs single-branch step (full fine-tuning)\n")
        print(markdown(RATIO_COLUMNS, ratios), flush=True)
        results["training"], results["cfg_single_ratio"] = rows, ratios
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
