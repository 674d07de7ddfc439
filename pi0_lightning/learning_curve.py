"""Learning curve of an RL run from its files, with significance: `python -m pi0_lightning.learning_curve RUN_DIR`.

Reads RUN_DIR/rollout_stats.jsonl (per-iteration rollout success, written by RolloutStatsWriter) and the CSV
logger's metrics (validation success per guidance weight). Reports the first vs the last iterations with a
two-proportion z-test, and whether guidance w > 1 did worse than w = 1 at the final validation.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path


def two_proportion_z(s1: float, n1: int, s2: float, n2: int) -> tuple[float, float]:
    """z statistic and one-sided p-value for H1: p2 > p1 (successes given as rates)."""
    p = (s1 * n1 + s2 * n2) / max(n1 + n2, 1)
    se = math.sqrt(max(p * (1 - p) * (1 / max(n1, 1) + 1 / max(n2, 1)), 1e-12))
    z = (s2 - s1) / se
    return z, 0.5 * math.erfc(z / math.sqrt(2))


def load(run: Path) -> tuple[list[dict], list[dict]]:
    stats = [json.loads(line) for line in (run / "rollout_stats.jsonl").read_text().splitlines() if line.strip()]
    metrics = []
    for file in sorted(run.glob("csv/*/metrics.csv")):
        metrics += list(csv.DictReader(file.open()))
    return stats, metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="run directory (trainer.default_root_dir)")
    p.add_argument("--window", type=int, default=3, help="final iterations pooled against iteration 0")
    args = p.parse_args(argv)
    if not (args.run / "rollout_stats.jsonl").is_file():
        print(f"learning_curve: error: {args.run}/rollout_stats.jsonl not found", file=sys.stderr)
        return 2
    stats, metrics = load(args.run)
    print("| iteration | rollout episodes | rollout success | useful groups | train chunks |")
    print("|---|---|---|---|---|")
    for s in stats:
        print(f"| {s['iteration']} | {s.get('rollout/episodes', 0):.0f} | {s['rollout/success_rate']:.3f} | "
              f"{s['rollout/useful_group_frac']:.2f} | {s['rollout/train_chunks']:.0f} |")  # fmt: skip
    w = min(args.window, max(1, len(stats) - 1))
    # iteration 0's rollouts come from the policy before any RL update: the baseline
    first, last = stats[:1], stats[-w:]

    def pooled(rows):
        n = sum(r.get("rollout/episodes", 0) for r in rows)
        s = sum(r["rollout/success_rate"] * r.get("rollout/episodes", 0) for r in rows)
        return s / max(n, 1), int(n)

    (r1, n1), (r2, n2) = pooled(first), pooled(last)
    z, pval = two_proportion_z(r1, n1, r2, n2)
    print(f"\nrollout success before RL (iteration 0): {r1:.3f} (n={n1}); last {w} iterations: {r2:.3f} (n={n2}); "
          f"z = {z:.2f}, one-sided p = {pval:.2g}")  # fmt: skip
    val = [m for m in metrics if m.get("val/success_rate")]
    if val:
        keys = [k for k in val[0] if k.startswith("val/success_rate_w")]
        print("\n| epoch | val success (first w) | " + " | ".join(keys) + " |")
        print("|" + "---|" * (2 + len(keys)))
        for m in val:
            print(f"| {m['epoch']} | {float(m['val/success_rate']):.3f} | "
                  + " | ".join(f"{float(m[k]):.3f}" for k in keys if m.get(k)) + " |")  # fmt: skip
        final = val[-1]
        for k in keys:
            if final.get(k):
                diff = float(final[k]) - float(final["val/success_rate"])
                print(f"final {k} - w=first: {diff:+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
