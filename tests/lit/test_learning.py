"""Learning proof, smaller budget than `make demo-learn`: RIPT-CFG raises a tiny random PI0's success on the reach
task significantly within a few RL iterations on CPU, and guidance w = 2 is not worse than w = 1 afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pi0_lightning.cli import main
from pi0_lightning.learning_curve import two_proportion_z

pytestmark = pytest.mark.slow
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "reach_learn.yaml"


def test_success_rises_significantly(tmp_path):
    run = tmp_path / "reach"
    args = ["fit", "--config", str(CONFIG), "--trainer.max_epochs", "6", "--trainer.check_val_every_n_epoch", "6"]
    args += ["--trainer.default_root_dir", str(run), "--trainer.logger", "null", "--trainer.callbacks", "null"]
    args += ["--trainer.callbacks+=pi0_lightning.callbacks.RolloutStatsWriter", "--trainer.callbacks.dirpath", str(run)]
    args += ["--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false"]
    assert main(args) == 0
    stats = [json.loads(line) for line in (run / "rollout_stats.jsonl").read_text().splitlines()]
    first = stats[0]
    last = stats[-2:]
    n2 = sum(s["rollout/episodes"] for s in last)
    r2 = sum(s["rollout/success_rate"] * s["rollout/episodes"] for s in last) / n2
    z, p = two_proportion_z(first["rollout/success_rate"], int(first["rollout/episodes"]), r2, int(n2))
    assert r2 > first["rollout/success_rate"] + 0.15 and p < 0.01, (first, r2, z, p)
