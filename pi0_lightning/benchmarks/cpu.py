"""CPU timings: `sample_actions` and one training forward/backward of PI0 / PI0.5 (dummy and tiny sizes),
and the conversion time of the openpi reference fixtures when ../shared is present. Prints a markdown table.

    python -m pi0_lightning.benchmarks.cpu [--variants pi0_dummy pi05_dummy pi0_tiny] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pi0_lightning.model.config import PI0Config
from pi0_lightning.model.observation import Observation, random_observation
from pi0_lightning.model.pi0 import PI0


def observation(cfg: PI0Config, batch: int) -> Observation:
    """Random inputs with a 48-token prompt of which 20 are valid (as the tables say)."""
    return random_observation(cfg, batch, prompt_lens=[20] * batch)


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def bench_model(variant: str, repeats: int) -> list[str]:
    torch.manual_seed(0)
    cfg = PI0Config.variant(variant)
    model = PI0(cfg).eval()
    obs = observation(cfg, 1)
    infer = median_ms(lambda: model.sample_actions(obs, num_steps=10), repeats)
    actions = torch.randn(1, cfg.action_horizon, cfg.action_dim)
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        model(obs, actions).mean().backward()

    train = median_ms(step, repeats)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return [variant, f"{params:.1f}", f"{infer:.0f}", f"{train:.0f}"]


def bench_conversion(repeats: int) -> list[list[str]]:
    from pi0_lightning.convert.cli import main as convert

    fixtures = Path.cwd().parent / "shared" / "fixtures" / "openpi"
    rows = []
    for name in ("pi0_tiny", "pi05_tiny"):
        if not (fixtures / name).is_dir():
            continue
        with tempfile.TemporaryDirectory() as tmp:
            ms = median_ms(
                lambda n=name, d=tmp: convert(["openpi", str(fixtures / n), f"{d}/out", "--overwrite"]), repeats
            )
        rows.append([name, f"{ms:.0f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["pi0_dummy", "pi05_dummy", "pi0_tiny"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print("\n| variant | params (M) | sample_actions, batch 1, 10 steps (ms) | train fwd+bwd, batch 1 (ms) |")
    print("|---|---|---|---|")
    for v in args.variants:
        print("| " + " | ".join(bench_model(v, args.repeats)) + " |", flush=True)
    rows = bench_conversion(args.repeats)
    if rows:
        print("\n| fixture | pi0-convert openpi, in-process (ms) |\n|---|---|")
        for r in rows:
            print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
