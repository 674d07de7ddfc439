"""Benchmark scripts (`python -m pi0_lightning.benchmarks.<name>`): each prints markdown tables for BENCHMARKS.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: Path | None, results: Any) -> None:
    """Also write a benchmark's results as JSON to `path` (no-op when None), creating its folder."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
