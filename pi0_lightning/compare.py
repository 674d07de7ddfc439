"""`make compare`: a markdown table of MLflow runs (latest metrics), to compare experiments without the UI.

    python -m pi0_lightning.compare [--experiment NAME ...] [--tracking-uri URI]

Default store: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db (the same default the training logger uses).
For charts, `mlflow ui --backend-store-uri sqlite:///runs/mlflow.db` and the Compare view.
"""

from __future__ import annotations

import argparse
import math
import sys

COLUMNS = [
    ("val/success_rate", "val success (w=first)"),
    ("rollout/success_rate", "rollout success"),
    ("rollout/useful_group_frac", "useful groups"),
    ("train/loss", "train loss"),
    ("iteration", "iterations"),  # the last finished iteration's index, shown as a count
    ("rollout/env_steps_per_s", "env steps/s"),
]


def fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    import mlflow

    from pi0_lightning.lit.logger import default_tracking_uri

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", nargs="*", help="experiment names (default: all)")
    p.add_argument("--tracking-uri", default=None)
    args = p.parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    experiments = client.search_experiments()
    if args.experiment:
        experiments = [e for e in experiments if e.name in args.experiment]
    rows = []
    for exp in experiments:
        for run in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"]):
            m = dict(run.data.metrics)
            if "iteration" in m:
                m["iteration"] = int(m["iteration"]) + 1
            rows.append([exp.name, run.info.run_name or run.info.run_id[:8], run.info.status.lower()]
                        + [fmt(m.get(k)) for k, _ in COLUMNS])  # fmt: skip
    if not rows:
        print(f"no runs in {uri}", file=sys.stderr)
        return 1
    header = ["experiment", "run", "status"] + [title for _, title in COLUMNS]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\n{len(rows)} run(s) in {uri}; charts: mlflow ui --backend-store-uri {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
