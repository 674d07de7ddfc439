"""GPU benchmark of PI0-FAST in bfloat16: decode latency per action chunk and the LOOP training step.

Random weights (speed does not depend on them; a random model never emits EOS, so every call decodes exactly
`tokens` tokens). LIBERO-shaped inputs as openpi's `pi0_fast_libero`: three valid 224x224 cameras and a 180-token
prompt whose first 60 tokens are valid (a typical `Task: ..., State: ...;\\n` prefix). What is measured:

1. decoding: `sample_tokens` (prefill + KV-cached greedy decoding) for 32 and 64 tokens per chunk (FAST LIBERO
   chunks take about 30-60), at batch 1 and 8, eager and with each step replayed as a CUDA graph
   (`FASTGraphDecoder`): median ms per call and per token, after warm-up, with CUDA events;
2. LOOP training: one AdamW step of `PI0FAST.action_logp` + `rl.loop.loop_loss` on 40-token chunks at batch 8 and
   16, full fine-tuning, without and with activation checkpointing: median step time and peak memory.

    python -m pi0_lightning.benchmarks.fast_decode [--variant pi0_fast] [--repeats 10] [--out fast.json]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from pi0_lightning.benchmarks import write_json
from pi0_lightning.benchmarks.gpu import OOM, device_info, free_memory, markdown, time_ms, warmup
from pi0_lightning.checkpoint import build_model
from pi0_lightning.model.config import IMAGE_KEYS
from pi0_lightning.model.observation import Observation
from pi0_lightning.model.pi0_fast import PI0FAST, PI0FASTConfig
from pi0_lightning.model.speed import SpeedConfig, apply_speed_paths, set_activation_checkpointing
from pi0_lightning.rl.loop import LOOPLossConfig, loop_loss

VALID_PROMPT = 60


def fast_observation(config: PI0FASTConfig, batch: int, device: torch.device) -> Observation:
    g = torch.Generator().manual_seed(0)
    s = config.vision.image_size
    images = {k: (torch.rand(batch, 3, s, s, generator=g) * 2 - 1).to(device) for k in IMAGE_KEYS}
    tokens = torch.randint(3, config.vocab_size // 2, (batch, 180), generator=g)
    mask = torch.arange(180)[None].expand(batch, -1) < VALID_PROMPT
    return Observation(
        images=images,
        image_masks={k: torch.ones(batch, dtype=torch.bool, device=device) for k in IMAGE_KEYS},
        state=torch.zeros(batch, 8, device=device),
        tokenized_prompt=(tokens * mask).to(device),
        tokenized_prompt_mask=mask.to(device),
        token_ar_mask=torch.zeros(batch, 180, dtype=torch.long, device=device),
    )


def build(variant: str, device: torch.device) -> PI0FAST:
    return build_model(PI0FASTConfig.variant(variant), device=device).apply_dtype_policy("bfloat16")


def bench_decode(model: PI0FAST, device, batches, token_counts, repeats, modes) -> list[dict[str, Any]]:
    """modes: eager (every step launched from Python), graph (each step replayed as a CUDA graph), compile (graph,
    with the transformer blocks torch.compiled first; compiles the model in place, so it runs last)."""
    rows = []
    model.eval()
    for mode in sorted(modes, key=lambda m: m == "compile"):
        speed = SpeedConfig(compile=mode == "compile" and device.type == "cuda", cuda_graphs=mode != "eager")
        decoder = apply_speed_paths(model, speed)
        for b in batches:
            obs = fast_observation(model.config, b, device)
            for n in token_counts:
                decode = partial(model.sample_tokens, obs, max_decoding_steps=n, decoder=decoder)
                row = {"mode": mode, "batch": b, "tokens": n}
                try:
                    ms = time_ms(decode, device, warmup(device, 2), repeats)
                    row.update(ms=ms, ms_per_token=ms / n)
                except torch.OutOfMemoryError:
                    row.update(ms=OOM, ms_per_token=OOM)
                rows.append(row)
                free_memory(device)
    return rows


def _loop_step(model, opt, obs, ids, logp_old, adv, mask, valid) -> None:
    logp = model.action_logp(obs, ids, temperature=1.0, max_decoding_steps=ids.shape[1])
    loss, _ = loop_loss(logp, logp_old, adv, mask, valid, LOOPLossConfig())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def bench_loop_step(model: PI0FAST, device, batches, tokens, repeats, checkpointing) -> list[dict[str, Any]]:
    rows = []
    model.train()
    set_activation_checkpointing(model.llm, checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")
    for b in batches:
        obs = fast_observation(model.config, b, device)
        offset = model.config.fast_offset
        ids = torch.randint(offset - 255, offset + 1, (b, tokens), device=device)  # FAST-range ids
        logp_old = torch.full((b, tokens), -3.0, device=device)
        adv = torch.linspace(-1, 1, b, device=device)
        mask = torch.ones(b, tokens, dtype=torch.bool, device=device)
        valid = torch.ones(b, dtype=torch.bool, device=device)

        step = partial(_loop_step, model, opt, obs, ids, logp_old, adv, mask, valid)
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            ms = time_ms(step, device, warmup(device, 2), max(repeats // 2, 3))
            mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            rows.append({"batch": b, "tokens": tokens, "ckpt": checkpointing, "ms": ms, "peak_gib": mem})
        except torch.OutOfMemoryError:
            rows.append({"batch": b, "tokens": tokens, "ckpt": checkpointing, "ms": OOM, "peak_gib": OOM})
        free_memory(device)
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="pi0_fast")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--tokens", type=int, nargs="+", default=[32, 64])
    p.add_argument("--train-batches", type=int, nargs="+", default=[8, 16])
    p.add_argument("--train-tokens", type=int, default=40)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--modes", nargs="+", default=["eager", "graph", "compile"], choices=["eager", "graph", "compile"])
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":  # as the entry points do (`graphs.use_tf32`)
        torch.set_float32_matmul_precision("high")
    model = build(args.variant, device)
    result: dict[str, Any] = {"device": device_info(device), "variant": args.variant}
    result["decode"] = bench_decode(model, device, args.batches, args.tokens, args.repeats, args.modes)
    print(f"PI0-FAST ({args.variant}, bf16) on {result['device']['device']}\n")
    cols = [
        ("mode", "mode", "s"),
        ("batch", "batch", "d"),
        ("tokens", "tokens decoded", "d"),
        ("ms", "ms / chunk", ".1f"),
    ]
    print(markdown(cols + [("ms_per_token", "ms / token", ".2f")], result["decode"]))
    if not args.skip_train:
        result["loop_step"] = []
        for ckpt in (False, True):
            result["loop_step"] += bench_loop_step(
                model, device, args.train_batches, args.train_tokens, args.repeats, ckpt
            )
        cols = [("batch", "batch", "d"), ("tokens", "tokens", "d"), ("ckpt", "act. ckpt", "")]
        cols += [("ms", "LOOP step ms", ".0f")]
        print("\n" + markdown(cols + [("peak_gib", "peak GiB", ".1f")], result["loop_step"]))
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
