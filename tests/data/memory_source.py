"""An in-memory DemoSource for unit tests of the SFT data pipeline (the file formats have their own tests)."""

from __future__ import annotations

import numpy as np

from pi0_lightning.data.source import EpisodeInfo


class MemorySource:
    def __init__(self, lengths=(7, 5, 9, 6), tasks=("pick up the bowl", "open the drawer"), size=32, seed=0):
        rng = np.random.default_rng(seed)
        self.episodes = [EpisodeInfo(i, n, tasks[i % len(tasks)]) for i, n in enumerate(lengths)]
        self.images = [rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8) for n in lengths]
        self.wrist = [rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8) for n in lengths]
        self.state = [rng.normal(size=(n, 8)).astype(np.float32) for n in lengths]
        self.actions = [rng.normal(size=(n, 7)).astype(np.float32) for n in lengths]

    def columns(self, episode: int) -> tuple[np.ndarray, np.ndarray]:
        return self.state[episode], self.actions[episode]

    def frame_images(self, episode: int, frame: int) -> tuple[np.ndarray, np.ndarray]:
        return self.images[episode][frame], self.wrist[episode][frame]
