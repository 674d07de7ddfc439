"""Learning proof for PI0-FAST, smaller budget than `make demo-learn-fast`: mediocre reach demonstrations, supervised
fine-tuning of a tiny random PI0-FAST on them (`configs/reach_sft_fast.yaml`), then LOOP raises the success of its
temperature-1 rollouts significantly within a few RL iterations on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pi0_lightning.cli import main
from pi0_lightning.envs.reach_demos import write_reach_demos
from pi0_lightning.learning_curve import two_proportion_z
from pi0_lightning.policy.pi0_fast_libero import FAST_TOKENIZER_DIR

pytestmark = pytest.mark.slow
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
QUIET = ["--trainer.logger", "null", "--trainer.enable_progress_bar", "false"]


def test_loop_raises_the_success_of_a_fine_tuned_policy(tmp_path):
    demos, demo_success = write_reach_demos(tmp_path / "demos", episodes=200)
    assert 0.3 < demo_success < 0.75  # mediocre on purpose: RL has room to improve

    sft = tmp_path / "sft"
    args = ["fit", "--config", str(CONFIGS / "reach_sft_fast.yaml"), "--data.dataset.path", str(demos)]
    args += ["--trainer.default_root_dir", str(sft), "--trainer.max_steps", "250", *QUIET]
    assert main(args) == 0
    export = sft / "export"
    assert (export / FAST_TOKENIZER_DIR / "tokenizer.json").is_file() and (export / "tokenizer.model").is_file()

    run = tmp_path / "reach_fast"
    args = ["fit", "--config", str(CONFIGS / "reach_learn_fast.yaml"), "--model.checkpoint", str(export)]
    args += ["--trainer.max_epochs", "8", "--trainer.check_val_every_n_epoch", "100"]
    args += ["--trainer.default_root_dir", str(run), "--trainer.callbacks", "null", *QUIET]
    args += ["--trainer.callbacks+=pi0_lightning.callbacks.RolloutStatsWriter"]
    args += ["--trainer.enable_checkpointing", "false"]
    assert main(args) == 0
    stats = [json.loads(line) for line in (run / "rollout_stats.jsonl").read_text().splitlines()]
    first, last = stats[0], stats[-3:]
    assert first["rollout/success_rate"] < 0.75  # the fine-tuned policy samples the mediocre mixture
    n2 = sum(s["rollout/episodes"] for s in last)
    r2 = sum(s["rollout/success_rate"] * s["rollout/episodes"] for s in last) / n2
    z, p = two_proportion_z(first["rollout/success_rate"], int(first["rollout/episodes"]), r2, int(n2))
    assert r2 > first["rollout/success_rate"] + 0.15 and p < 0.01, (first["rollout/success_rate"], r2, z, p)
