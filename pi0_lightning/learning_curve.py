"""Learning curve of an RL run from its files, with significance: `python -m pi0_lightning.learning_curve RUN_DIR`.

Reads RUN_DIR/rollout_stats.jsonl (per-iteration rollout success) and RUN_DIR/validation.jsonl (each validation's
episode and success counts per evaluation setting), both written by `callbacks.RolloutStatsWriter`. Reports the
first vs the last iterations' rollout success, and the validations, with one-sided two-proportion z-tests:
`--before DIR` compares the final validation with the last one in DIR (e.g. the starting policy's `validate
--initial_weights true` run), per evaluation setting against the before run's first setting. Where
RUN_DIR/timing.jsonl exists, a table splits each iteration's wall clock into rollout, training, validation and the
time between two iterations that is neither (checkpointing, loader setup), with the peak GPU memory.
"""

from __future__ import annotations

import argparse
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


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file the run's callbacks append to; none if it does not exist (yet)."""
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def load(run: Path) -> tuple[list[dict], list[dict]]:
    return read_jsonl(run / "rollout_stats.jsonl"), read_jsonl(run / "validation.jsonl")


def timing_table(rows: list[dict]) -> list[str]:
    """Markdown rows of the per-iteration time split; "between" is the gap before an iteration's epoch less its
    rollout, so the first iteration has none."""

    def cell(x: float | None, fmt: str = ".1f") -> str:
        return "-" if x is None else format(x, fmt)

    out = [
        "| iteration | rollout (s) | env wait (s) | policy (s) | resets (worker-s) | training (s) | validation (s) "
        "| between (s) | peak GPU (GiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    previous_end = None
    for r in rows:
        between = None
        if previous_end is not None and r.get("rollout_seconds") is not None:
            between = r["started"] - previous_end - r["rollout_seconds"]
        cells = [
            cell(r.get(k)) for k in ("rollout_seconds", "env_wait_seconds", "policy_seconds", "reset_worker_seconds")
        ]
        cells += [cell(r["train_seconds"]), cell(r["validation_seconds"]), cell(between)]
        out.append(f"| {r['iteration']} | " + " | ".join(cells) + f" | {cell(r.get('gpu_peak_gib'), '.2f')} |")
        previous_end = r["ended"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="run directory (trainer.default_root_dir)")
    p.add_argument("--window", type=int, default=3, help="final iterations pooled against iteration 0")
    p.add_argument("--before", type=Path, help="run directory whose last validation is the baseline")
    args = p.parse_args(argv)
    if not (args.run / "rollout_stats.jsonl").is_file():
        print(f"learning_curve: error: {args.run}/rollout_stats.jsonl not found", file=sys.stderr)
        return 2
    stats, validations = load(args.run)
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
    if validations:
        print(
            "\n| validation after iteration | " + " | ".join(st["metric"] for st in validations[0]["settings"]) + " |"
        )
        print("|---|" + "---|" * len(validations[0]["settings"]))
        for v in validations:
            cells = [f"{st['success_rate']:.3f} ({st['successes']}/{st['episodes']})" for st in v["settings"]]
            print(f"| {v['iterations_trained']} | " + " | ".join(cells) + " |")
    timing = read_jsonl(args.run / "timing.jsonl")
    if timing:
        print("\n" + "\n".join(timing_table(timing)))
    if args.before is not None:
        _, before = load(args.before)
        if not before or not validations:
            print(f"learning_curve: error: no validation.jsonl entries in {args.before if not before else args.run}",
                  file=sys.stderr)  # fmt: skip
            return 2
        base = before[-1]["settings"][0]
        n1, r1 = base["episodes"], base["success_rate"]
        print(f"\nbefore ({args.before}, {base['metric']}): {r1:.3f} (n={n1})")
        for st in validations[-1]["settings"]:
            z, pval = two_proportion_z(r1, n1, st["success_rate"], st["episodes"])
            print(f"after {validations[-1]['iterations_trained']} iterations, {st['metric']}: "
                  f"{st['success_rate']:.3f} (n={st['episodes']}); z = {z:.2f}, one-sided p = {pval:.2g}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
