"""Shared test fixtures: paths to the openpi reference fixtures in ../shared and converted copies of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pi0_lightning.demo import reference_observation
from pi0_lightning.model.config import IMAGE_KEYS
from pi0_lightning.model.observation import Observation

OPENPI_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "openpi"


@pytest.fixture(scope="session")
def openpi_fixtures() -> Path:
    if not OPENPI_FIXTURES.is_dir():
        pytest.skip(f"openpi reference fixtures not found at {OPENPI_FIXTURES} (clone the project beside ../shared)")
    return OPENPI_FIXTURES


@pytest.fixture(scope="session")
def converted(openpi_fixtures, tmp_path_factory):
    """name -> our checkpoint directory converted from the openpi fixture by `pi0-convert openpi` (cached)."""
    pytest.importorskip("tensorstore")
    from pi0_lightning.convert.cli import main

    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            out = tmp_path_factory.mktemp("converted") / name
            ref = np.load(openpi_fixtures / name / "reference.npz")
            argv = ["openpi", str(openpi_fixtures / name), str(out)]
            argv += ["--max-token-len", str(ref["tokenized_prompt"].shape[1])]
            assert main(argv) == 0
            cache[name] = out
        return cache[name]

    return get


observation_from_reference = reference_observation


def random_observation(config, batch_size: int = 2, seed: int = 0, prompt_lens=None) -> Observation:
    """Random model-space inputs for a config (images in [-1, 1], right-padded prompts, third camera masked)."""
    g = torch.Generator().manual_seed(seed)
    size = config.vision.image_size
    lens = prompt_lens or [min(5 + 3 * i, config.max_token_len) for i in range(batch_size)]
    mask = torch.arange(config.max_token_len)[None] < torch.tensor(lens)[:, None]
    tokens = torch.randint(3, config.vocab_size, (batch_size, config.max_token_len), generator=g) * mask
    return Observation(
        images={k: torch.rand(batch_size, 3, size, size, generator=g) * 2 - 1 for k in IMAGE_KEYS},
        image_masks={k: torch.full((batch_size,), k != "right_wrist_0_rgb") for k in IMAGE_KEYS},
        state=torch.randn(batch_size, config.action_dim, generator=g),
        tokenized_prompt=tokens,
        tokenized_prompt_mask=mask,
    )


@pytest.fixture(autouse=True)
def _isolated_mlflow_uri(monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; undo it so no test (or its subprocesses) inherits
    another test's store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
