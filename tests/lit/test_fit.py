"""`pi0-lightning fit/validate` end to end on the reach task: checkpoints, export, MLflow, resume, bad input, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lit_config import write_config

from pi0_lightning.cli import main
from pi0_lightning.model.pi0 import PI0

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def mlflow_runs(tmp_path: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["test"])


def test_fit_then_validate(tmp_path):
    config = write_config(tmp_path, epochs=1)
    assert main(["fit", "--config", str(config)]) == 0
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    stats = [json.loads(line) for line in (run / "rollout_stats.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in stats] == [0] and stats[0]["rollout/groups"] >= 2
    # the exported policy is a plain checkpoint with the CFG condition embedding and the tokenizer it was trained with
    model = PI0.from_pretrained(run / "export")
    assert model.cfg_embed is not None and model.config.num_cfg_conditions == 2
    assert any(p.suffix == ".model" for p in (run / "export").iterdir())
    runs = mlflow_runs(tmp_path)
    assert len(runs) == 1
    keys = ["val/success_rate", "val/success_rate_w2", "rollout/useful_group_frac", "train/loss"]
    keys += ["rollout/env_steps_per_s", "rollout/policy_ms_per_call", "rollout/adv_abs_mean", "train/fm_null"]
    for key in keys:
        assert f"metrics.{key}" in runs.columns and runs[f"metrics.{key}"].notna().all(), key
    assert (run / "success_rate.png").is_file() and list((run / "videos").glob("iteration_*/*.mp4"))
    assert main(["validate", "--config", str(config), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]) == 0
    assert len(mlflow_runs(tmp_path)) == 1  # validate continued the same MLflow run
    # each validation's counts (fit's, then validate's of the same weights) for significance tests
    validations = [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines()]
    assert [v["iterations_trained"] for v in validations] == [1, 1]
    assert validations[0]["settings"] == validations[1]["settings"]  # the same weights, seeds and init states
    first = validations[0]["settings"][0]
    assert [s["metric"] for s in validations[0]["settings"]] == ["val/success_rate", "val/success_rate_w2"]
    assert first["episodes"] == sum(t["episodes"] for t in first["per_task"].values()) > 0


def test_bad_inputs_fail_cleanly(tmp_path, capsys):
    config = write_config(tmp_path)
    assert main(["fit", "--config", str(config), "--model.checkpoint", str(tmp_path / "missing")]) == 2
    assert main(["fit", "--config", str(config), "--data.env.name", "libero", "--data.env.suite", "libero_nope"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "valid suites" in err
    assert not (tmp_path / "run").exists()  # nothing was written


def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.Popen([sys.executable, "-m", "pi0_lightning.cli", *args], cwd=ROOT, env=env, **kw)


def test_two_process_ddp_stays_in_lockstep(tmp_path):
    probe = {"class_path": "ddp_probe.LockstepProbe", "init_args": {"out_dir": str(tmp_path / "probe")}}
    # groups_per_rank 1 of 2 contexts x 3 rounds: ranks keep different numbers of useful chunks (uneven sampling)
    config = write_config(
        tmp_path,
        epochs=2,
        extra_callbacks=[probe],
        sampling={"group_size": 4, "groups_per_rank": 2, "contexts_per_round": 2, "max_rounds": 3},
    )
    args = ["fit", "--config", str(config), "--config", str(ROOT / "configs" / "trainer" / "cpu_ddp.yaml")]
    assert _cli(args).wait(timeout=900) == 0
    ranks = [
        [json.loads(line) for line in (tmp_path / "probe" / f"rank{r}.jsonl").read_text().splitlines()]
        for r in range(2)
    ]
    steps = [[x for x in recs if "checksum" in x] for recs in ranks]
    batches = [[x["batches"] for x in recs if "batches" in x] for recs in ranks]
    assert batches[0] == batches[1] and len(batches[0]) == 2  # same number of batches every iteration
    assert [s["step"] for s in steps[0]] == [s["step"] for s in steps[1]]
    for a, b in zip(steps[0], steps[1], strict=True):  # identical weights after every step
        assert a["checksum"] == pytest.approx(b["checksum"], rel=1e-6, abs=1e-6)
    valid = [sum(s["valid"] for s in st) for st in steps]
    total_slots = 8 * len(steps[0])
    assert min(valid) < total_slots  # padding with masked samples happened on at least one rank


def test_fast_fit_validate_and_export(tmp_path):
    """PI0-FAST through the same CLI: LOOP rollouts with token records, validation, resume assets, export."""
    from pi0_lightning.policy.loading import load_policy
    from pi0_lightning.policy.pi0_fast_libero import LiberoFASTPolicy

    model = {
        "variant": "pi0_fast_micro",
        "algorithm": {"name": "loop", "max_decoding_steps": 12, "eval_temperature": 0.0},
    }
    config = write_config(tmp_path, epochs=1, model=model, video_episodes=0)
    assert main(["fit", "--config", str(config)]) == 0
    run = tmp_path / "run"
    stats = json.loads((run / "rollout_stats.jsonl").read_text().splitlines()[0])
    assert 0.0 <= stats["rollout/undecodable_frac"] <= 1.0  # a random PI0-FAST rarely writes a decodable action
    policy = load_policy(run / "export", max_decoding_steps=12)
    assert isinstance(policy, LiberoFASTPolicy) and policy.action_tokenizer.vocab_size > 0
    runs = mlflow_runs(tmp_path)
    assert runs["metrics.val/success_rate"].notna().all() and "metrics.train/ratio_mean" in runs.columns
    assert main(["validate", "--config", str(config), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]) == 0


def test_checkpoint_without_its_assets_fails_before_anything_is_written(tmp_path, capsys):
    from pi0_lightning.model.pi0_fast import PI0FAST, PI0FASTConfig
    from pi0_lightning.policy.assets import small_prompt_tokenizer

    config = write_config(tmp_path)
    tok = small_prompt_tokenizer(["reach the red target"], tmp_path / "tok" / "tokenizer.model", 1000, fast=True)
    stats = {"norm_stats": {k: {"mean": [0.0] * 8, "std": [1.0] * 8} for k in ("state", "actions")}}
    fast = PI0FAST(PI0FASTConfig.variant("pi0_fast_micro"))
    fast.save_pretrained(tmp_path / "bare")
    fast.save_pretrained(tmp_path / "no_fast", norm_stats=stats, tokenizer_path=tok)
    for ckpt in ("bare", "no_fast"):
        assert main(["fit", "--config", str(config), "--model.checkpoint", str(tmp_path / ckpt)]) == 2
    err = capsys.readouterr().err
    assert "bundles no PaliGemma tokenizer" in err and "bundles no FAST processor" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlflow.db").exists()
