"""Benchmark scripts (`python -m pi0_lightning.benchmarks.<name>`): each prints markdown tables for BENCHMARKS.md."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def write_json(path: Path | None, results: Any) -> None:
    """Also write a benchmark's results as JSON to `path` (no-op when None), creating its folder."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")


COPIES = 8
"""Weight copies a timed GEMM graph rotates over: more than the L2 cache holds, so weights come from memory."""


def rotating(fn: Callable, weights: list[torch.Tensor]) -> Callable[[int], object]:
    """Call i of a timed graph uses weight copy i mod COPIES."""
    return lambda i: fn(weights[i % COPIES])


def graph_time_us(fn: Callable[[int], object], calls: int = 40, replays: int = 15) -> float:
    """Median time per call in us of `fn(i)`, i = 0..calls-1, captured as one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation, autotuning) outside the capture
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]
