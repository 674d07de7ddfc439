"""Supervised fine-tuning input pipeline throughput: samples/s that DataLoader workers deliver as model inputs
(frames decoded, resized to 224, augmented as openpi, prompt tokenised, chunk built, batch collated), with frames
stored as PNG inside parquet and as AV1 video, for each worker count. Prints markdown.

    python -m pi0_lightning.benchmarks.sft_loader [--workers 0 1 2] [--batches 12] [--batch-size 32]

The dataset is written first in openpi's LIBERO layout (LeRobot v3.0, 256x256 frames, 8-d state, 7-d actions):
`--episodes` episodes of `--length` steps of a synthetic tabletop (smooth shading, moving objects, sensor noise), so
that PNG and AV1 compress about as real renders do. Each timed run draws shuffled samples over all episodes (random
access, as training does) after one warm-up batch per worker; the PI0 inputs are a tiny model's (the pipeline does
not depend on the model's size, only on its image size, horizon and tokenizer).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from pi0_lightning.data.augment import AugmentConfig
from pi0_lightning.data.demos import LOADER_CONTEXT, DemoDataConfig, DemoDataset, open_source, supervised_collate
from pi0_lightning.data.lerobot_writer import DemoEpisode, write_lerobot_dataset
from pi0_lightning.data.norm_stats import compute_norm_stats
from pi0_lightning.model.config import PI0Config
from pi0_lightning.model.pi0 import PI0
from pi0_lightning.policy.assets import small_prompt_tokenizer
from pi0_lightning.policy.pi0_libero import LiberoPolicy

TASKS = ("pick up the black bowl and place it on the plate", "open the top drawer of the cabinet")


def scene(t: int, length: int, size: int, rng: np.random.Generator, wrist: bool) -> np.ndarray:
    """A smooth synthetic frame: shaded table, two moving blocks, mild noise (compresses like a render)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.stack([0.45 + 0.2 * y, 0.35 + 0.15 * x, 0.25 + 0.1 * (x + y)], -1)
    phase = t / max(1, length - 1)
    for k, colour in enumerate(((0.8, 0.2, 0.2), (0.2, 0.3, 0.8))):
        cx, cy = 0.3 + 0.4 * phase * (1 if k else -0.5) + 0.2 * k, 0.5 + 0.1 * k
        if wrist:
            cx, cy = 0.5 + (cx - 0.5) * 2, 0.5 + (cy - 0.5) * 2
        inside = (np.abs(x - cx) < 0.08) & (np.abs(y - cy) < 0.08)
        img[inside] = colour
    img += rng.normal(0, 0.01, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_dataset(root: Path, storage: str, episodes: int, length: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    demos = []
    for e in range(episodes):
        images = np.stack([scene(t, length, size, rng, False) for t in range(length)])
        wrist = np.stack([scene(t, length, size, rng, True) for t in range(length)])
        state = rng.normal(0, 0.1, (length, 8)).astype(np.float32)
        actions = rng.uniform(-1, 1, (length, 7)).astype(np.float32)
        demos.append(DemoEpisode(images, wrist, state, actions, TASKS[e % len(TASKS)]))
    return write_lerobot_dataset(root, demos, fps=10, version="v3.0", image_storage=storage)


def inputs_for(source, tmp: Path, horizon: int):
    model = PI0(PI0Config.variant("pi0_tiny", action_horizon=horizon))
    tok = small_prompt_tokenizer(list(TASKS), tmp / "tok.model", min(1000, model.config.vocab_size))
    stats = compute_norm_stats(source, horizon, delta_actions=True)
    return LiberoPolicy.build(model, stats, tok, delta_actions=True).inputs_only()


def samples_per_s(ds: DemoDataset, inputs, workers: int, batches: int, batch_size: int) -> float:
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        collate_fn=partial(supervised_collate, inputs=inputs),
        generator=torch.Generator().manual_seed(0),
        multiprocessing_context=LOADER_CONTEXT if workers else None,
    )
    it = iter(loader)
    for _ in range(max(1, workers)):  # every worker's first batch: start-up and file opening
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * batch_size / (time.perf_counter() - t0)
    del it
    return rate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batches", type=int, default=12, help="timed batches per run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--episodes", type=int, default=8)
    p.add_argument("--length", type=int, default=100)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--horizon", type=int, default=50)
    p.add_argument("--storages", nargs="+", default=["image", "video"], choices=["image", "video"])
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the main process only collects batches; workers use one thread each
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{datetime.date.today().isoformat()}; batch {args.batch_size}, {args.episodes} episodes x {args.length} "
        f"steps, {args.size}x{args.size} frames, H = {args.horizon}, openpi augmentation on\n"
    )
    print("| frames stored as | dataset size (MB) | workers | samples/s | samples/s per worker |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for storage in args.storages:
            root = write_dataset(tmp / storage, storage, args.episodes, args.length, args.size)
            mb = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 1e6
            source = open_source(DemoDataConfig(path=str(root)))
            inputs = inputs_for(source, tmp, args.horizon)
            ds = DemoDataset(source, list(range(len(source.episodes))), inputs, args.horizon, augment=AugmentConfig())
            label = "PNG in parquet" if storage == "image" else "AV1 video"
            for workers in args.workers:
                rate = samples_per_s(ds, inputs, workers, args.batches, args.batch_size)
                per = rate / max(1, workers)
                name = f"{workers} (in process)" if workers == 0 else str(workers)
                print(f"| {label} | {mb:.1f} | {name} | {rate:.1f} | {per:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
