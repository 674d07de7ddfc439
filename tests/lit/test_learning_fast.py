"""Learning proof for PI0-FAST, smaller budget than `make demo-learn-fast`: a supervised warm start on the reach
task, then LOOP raises the success of its temperature-1 rollouts significantly within a few RL iterations on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pi0_lightning.cli import main
from pi0_lightning.learning_curve import two_proportion_z
from pi0_lightning.policy.pi0_fast_libero import FAST_TOKENIZER_DIR
from pi0_lightning.warmstart import WarmStartConfig, warm_start

pytestmark = pytest.mark.slow
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "reach_learn_fast.yaml"


def test_loop_raises_warm_started_success(tmp_path):
    sft = tmp_path / "sft"
    result = warm_start(WarmStartConfig(eval_episodes=50), sft)
    assert (sft / FAST_TOKENIZER_DIR / "tokenizer.json").is_file() and (sft / "tokenizer.model").is_file()
    # the mixture's mode is the expert: greedy decoding solves the task, sampling reproduces the mediocre mixture
    assert result["greedy_success"] > 0.9 and result["sampled_success"] < 0.75

    run = tmp_path / "reach_fast"
    args = ["fit", "--config", str(CONFIG), "--model.checkpoint", str(sft), "--trainer.max_epochs", "8"]
    args += ["--trainer.check_val_every_n_epoch", "100", "--trainer.default_root_dir", str(run)]
    args += ["--trainer.logger", "null", "--trainer.callbacks", "null", "--trainer.enable_progress_bar", "false"]
    args += ["--trainer.callbacks+=pi0_lightning.callbacks.RolloutStatsWriter", "--trainer.callbacks.dirpath", str(run)]
    args += ["--trainer.enable_checkpointing", "false"]
    assert main(args) == 0
    stats = [json.loads(line) for line in (run / "rollout_stats.jsonl").read_text().splitlines()]
    first, last = stats[0], stats[-3:]
    n2 = sum(s["rollout/episodes"] for s in last)
    r2 = sum(s["rollout/success_rate"] * s["rollout/episodes"] for s in last) / n2
    z, p = two_proportion_z(first["rollout/success_rate"], int(first["rollout/episodes"]), r2, int(n2))
    assert r2 > first["rollout/success_rate"] + 0.15 and p < 0.01, (first["rollout/success_rate"], r2, z, p)
