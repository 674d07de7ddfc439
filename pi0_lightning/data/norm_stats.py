"""Normalisation statistics of a demonstration dataset, in openpi's `norm_stats.json` format:

    {"norm_stats": {"state": {"mean", "std", "q01", "q99"}, "actions": {"mean", "std", "q01", "q99"}}}

computed as openpi's `compute_norm_stats.py` does, on what the model is trained on: the raw state of every step, and
every row of every step's action chunk (H rows, past the episode's end the last action repeated) after the delta
transform (a[:6] -= s_t[:6], for `pi0_libero` and `pi0_fast_libero`; PI0.5 trains on absolute actions).
Deliberate difference: quantiles are numpy's exact ones (openpi approximates them with 5000-bin histograms).

    python -m pi0_lightning.data.norm_stats DATASET --model pi0        # -> DATASET/norm_stats.json
    python -m pi0_lightning.data.norm_stats DATASET --horizon 10 --no-delta-actions --out stats.json

Training reads `<dataset>/norm_stats.json` (or `data.dataset.norm_stats`), and the exported checkpoint bundles it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pi0_lightning.convert.io import atomic_output_file
from pi0_lightning.data.source import DatasetError, DemoSource

MODEL_DEFAULTS = {"pi0": (50, True), "pi05": (10, False), "pi0_fast": (10, True)}
"""openpi's LIBERO training configs: (action horizon, delta actions)."""
DELTA_DIMS = 6


def _stats(x: np.ndarray) -> dict[str, list[float]]:
    x = x.astype(np.float64)
    return {
        "mean": x.mean(0).tolist(),
        "std": x.std(0).tolist(),
        "q01": np.quantile(x, 0.01, axis=0).tolist(),
        "q99": np.quantile(x, 0.99, axis=0).tolist(),
    }


def model_space_chunks(state: np.ndarray, actions: np.ndarray, horizon: int, delta_actions: bool) -> np.ndarray:
    """(T, H, A): step t's chunk a_t .. a_{t+H-1} (clamped to the last step), minus s_t[:6] if `delta_actions`."""
    t = len(actions)
    rows = np.minimum(np.arange(t)[:, None] + np.arange(horizon)[None], t - 1)
    chunks = actions[rows].astype(np.float64)
    if delta_actions:
        chunks[..., :DELTA_DIMS] -= state[:, None, :DELTA_DIMS]
    return chunks


def demo_chunks(
    source: DemoSource, episodes: list[int], horizon: int, delta_actions: bool, limit: int = 4000, seed: int = 0
) -> np.ndarray:
    """Up to `limit` model-space chunks (N, H, A) of `episodes`, unnormalised (a random PI0-FAST's FAST processor is
    fitted on them)."""
    chunks = np.concatenate([model_space_chunks(*source.columns(e), horizon, delta_actions) for e in episodes])
    if len(chunks) > limit:
        chunks = chunks[np.random.default_rng(seed).choice(len(chunks), limit, replace=False)]
    return chunks


def compute_norm_stats(
    source: DemoSource, horizon: int, delta_actions: bool, episodes: list[int] | None = None, progress: bool = False
) -> dict:
    states, actions = [], []
    ids = range(len(source.episodes)) if episodes is None else episodes
    for e in tqdm(ids, desc="norm stats", unit="ep", disable=not progress):
        s, a = source.columns(e)
        states.append(s)
        actions.append(model_space_chunks(s, a, horizon, delta_actions).reshape(-1, a.shape[-1]))
    if not states:
        raise DatasetError("no episodes to compute norm stats on")
    return {"norm_stats": {"state": _stats(np.concatenate(states)), "actions": _stats(np.concatenate(actions))}}


def write_json_atomic(data: dict, path: Path) -> None:
    with atomic_output_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def default_path(dataset: str | Path) -> Path:
    """Where training looks for a dataset's stats: inside a dataset directory, beside a single HDF5 file."""
    dataset = Path(dataset)
    return (dataset if dataset.is_dir() else dataset.parent) / "norm_stats.json"


def main(argv: list[str] | None = None) -> int:
    from pi0_lightning.data.demos import DemoDataConfig, open_source
    from pi0_lightning.data.source import KeyMap

    p = argparse.ArgumentParser(description="Write openpi-format norm_stats.json for a demonstration dataset.")
    p.add_argument("dataset", help="LeRobot dataset root, or LIBERO HDF5 file / directory")
    p.add_argument("--model", choices=sorted(MODEL_DEFAULTS), default="pi0", help="sets --horizon and delta actions")
    p.add_argument("--horizon", type=int, default=None, help="action chunk length H (default: the model's)")
    p.add_argument("--delta-actions", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--format", choices=["auto", "lerobot", "hdf5"], default="auto")
    p.add_argument("--keys", default=None, help="image,wrist_image,state,actions feature names (LeRobot)")
    p.add_argument("--out", default=None, help="default: norm_stats.json in the dataset directory")
    args = p.parse_args(argv)
    horizon, delta = MODEL_DEFAULTS[args.model]
    horizon = args.horizon or horizon
    delta = delta if args.delta_actions is None else args.delta_actions
    keys = KeyMap(*args.keys.split(",")) if args.keys else KeyMap()
    try:
        source = open_source(DemoDataConfig(path=args.dataset, format=args.format, keys=keys))
        stats = compute_norm_stats(source, horizon, delta, progress=True)
    except DatasetError as e:
        print(f"norm_stats: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else default_path(args.dataset)
    write_json_atomic(stats, out)
    n = sum(ep.length for ep in source.episodes)
    print(f"wrote {out} ({len(source.episodes)} episodes, {n} steps, horizon {horizon}, delta actions {delta})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
