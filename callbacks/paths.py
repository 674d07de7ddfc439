"""Where a callback writes when its YAML gives no path: under the trainer's root directory (`default_root_dir`),
so an experiment names its run directory once."""

from __future__ import annotations

from pathlib import Path

import lightning as L


def under_root(trainer: L.Trainer, given: str | Path | None, *parts: str) -> Path:
    """`given` if set, else `<default_root_dir>/<parts...>`."""
    return Path(given) if given is not None else Path(trainer.default_root_dir, *parts)
