"""Batch-1 latency of the CUDA-graphed, compiled sampler, for A/B measurements of single changes.

    python -m pi0_lightning.benchmarks.batch1 [--variants default matmul-prefix ...] [--repeats 50]
    cp pi0_lightning/benchmarks/batch1.py /tmp && PYTHONPATH=/path/to/old/checkout python /tmp/batch1.py

Full-size `pi0` in bf16 with random weights, the always-masked camera left out (as `LiberoPolicy` does), 10 Euler
steps, `CUDAGraphSampler(model, compile=True)` as the GPU experiment configs run it. Each variant is captured anew
and timed three times (median of `--repeats` replays each, CUDA events, `benchmarks.gpu.time_ms`); the fastest of
the three is reported, because machine noise only ever adds time. Variants, all in one process so that they share
the machine:

- `default`: the code as it is;
- `matmul-prefix`: the prefix pass's attention on the float32 matmul path instead of the Triton kernel;
- `sdpa-prefix`: the prefix pass's attention on SDPA;
- `unfolded-qkv` / `unfolded`: the RMSNorm before q/k/v (and before gate/up) as a separate kernel instead of folded
  into the few-row GEMMs;
- `full-prefix`: the prefix pass runs its last layer whole (attention, o_proj, MLP) and the final norm, whose
  outputs nothing reads, instead of stopping after that layer's keys and values (`JointGemma.forward`'s
  `cache_only`).

A variant may be named more than once (`default full-prefix default full-prefix`) for alternating A/B rows.

Only APIs that older commits have too are used, so the script file also runs against an older checkout of the
package (the second line above; copied out of the package so that its folder does not shadow standard modules) for
before/after rows in the same device call. Prints one line per variant and the
largest difference of its actions from the first variant's.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from functools import partial

import torch

VARIANTS = ("default", "matmul-prefix", "sdpa-prefix", "unfolded-qkv", "unfolded", "full-prefix")


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=["default"], choices=VARIANTS)
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("batch1: error: needs a CUDA device")
    from pi0_lightning.benchmarks.cpu import observation
    from pi0_lightning.benchmarks.gpu import time_ms
    from pi0_lightning.checkpoint import build_model
    from pi0_lightning.model import gemma, kernels
    from pi0_lightning.model.config import PI0Config
    from pi0_lightning.model.graphs import CUDAGraphSampler

    torch.set_float32_matmul_precision("high")  # as the entry points do (graphs.use_tf32)
    device = torch.device("cuda")
    config = PI0Config.variant("pi0")
    torch.manual_seed(0)
    model = build_model(config, device=device).apply_dtype_policy("bfloat16").eval()
    obs = observation(config, 1).to(device)
    obs.images.pop("right_wrist_0_rgb")
    obs.image_masks.pop("right_wrist_0_rgb")
    noise = torch.randn(1, config.action_horizon, config.action_dim, device=device)
    small_attention, tiling_for, llm_forward = gemma.SMALL_ATTENTION, kernels.tiling_for, gemma.JointGemma.forward

    def suffix_only_kernel(q: torch.Tensor, num_kv_heads: int):  # long query blocks are the prefix pass
        return None if q.shape[2] > config.action_horizon + 1 else tiling_for(q, num_kv_heads)

    def whole_last_layer(self, *args, cache_only: bool = False, **kwargs):  # older checkouts lack the argument
        return llm_forward(self, *args, **kwargs)

    outputs, latency = {}, {}
    for variant in args.variants:  # a repeated variant overwrites its entry: the last run is returned
        gemma.SMALL_ATTENTION = 0 if variant == "sdpa-prefix" else small_attention
        kernels.tiling_for = suffix_only_kernel if variant == "matmul-prefix" else tiling_for
        gemma.JointGemma.forward = whole_last_layer if variant == "full-prefix" else llm_forward
        sampler = CUDAGraphSampler(model, compile=True)
        for layer in model.llm.layers:  # the sampler (re)built the stacked and norm-folded copies
            expert = layer.experts[1]
            if variant.startswith("unfolded"):
                expert.folded_qkv = None
            if variant == "unfolded":
                expert.mlp.folded = None
        call = partial(sampler, obs, noise)
        runs = [time_ms(call, device, warmup=3, repeats=args.repeats) for _ in range(3)]
        outputs[variant], latency[variant] = sampler(obs, noise).float(), min(runs)
        sampler.reset()
        print(f"{variant}: batch 1 {min(runs):.2f} ms ({', '.join(f'{r:.2f}' for r in runs)})", flush=True)
    gemma.SMALL_ATTENTION, kernels.tiling_for, gemma.JointGemma.forward = small_attention, tiling_for, llm_forward
    first = outputs[args.variants[0]]
    for variant, out in outputs.items():
        print(f"{variant}: max |actions - {args.variants[0]}| {(out - first).abs().max().item():.2e}")
    return latency


if __name__ == "__main__":
    main()
