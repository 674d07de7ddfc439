"""Runs a cluster user can trust, end to end on the reach task: which MLflow run a command logs into, bad input that
leaves everything as it was, resuming after kill -9 or a preemption signal without logging a step twice."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lit_config import write_config

from pi0_lightning.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def client(tmp_path: Path):
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def runs(tmp_path: Path) -> list:
    c = client(tmp_path)
    exp = c.get_experiment_by_name("test")
    return c.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"]) if exp else []


def history(tmp_path: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client(tmp_path).get_metric_history(run_id, key)]


def cli(args: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "pi0_lightning.cli", *args], cwd=ROOT, env=env, **kw)


def wait_for_iteration(proc: subprocess.Popen, stats: Path, iteration: int, timeout: float = 300) -> None:
    """Return once `iteration` has started (its rollout stats are written at the epoch's start)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if stats.is_file() and f'"iteration": {iteration}' in stats.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"iteration {iteration} did not start (exit code {proc.poll()})")


def ours(stderr: str) -> list[str]:
    """stderr without Python warnings (LightningCLI warns when called in-process with args and a config file)."""
    return [line for line in stderr.strip().splitlines() if "Warning" not in line and "warn(" not in line]


def assert_each_step_once(tmp_path: Path, run_id: str, iterations: int) -> None:
    assert [v for _, v in history(tmp_path, run_id, "iteration")] == [float(i) for i in range(iterations)]
    for key in ("train/loss", "rollout/success_rate", "val/success_rate"):
        steps = [s for s, _ in history(tmp_path, run_id, key)]
        assert steps and len(steps) == len(set(steps)), (key, steps)


def test_run_identity_and_bad_input(tmp_path, capsys):
    config = str(write_config(tmp_path, epochs=1))
    run = tmp_path / "run"
    assert main(["fit", "--config", config]) == 0
    (first,) = runs(tmp_path)
    assert re.fullmatch(r"run-reach-\d{8}-\d{6}", first.info.run_name), first.info.run_name
    assert first.info.status == "FINISHED" and list((run / "videos" / "iteration_0001").glob("*.mp4"))
    capsys.readouterr()

    # bad input: one line, exit 2, the finished run untouched
    bad = tmp_path / "bad_weights"
    shutil.copytree(run / "export", bad)
    (bad / "model.safetensors").write_bytes(os.urandom(2048))
    truncated = tmp_path / "truncated.ckpt"
    data = (run / "checkpoints" / "last.ckpt").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    for args in (
        ["fit", "--config", config, "--model.checkpoint", str(bad)],
        ["validate", "--config", config],
        ["validate", "--config", config, "--ckpt_path", str(tmp_path / "nope" / "last.ckpt")],
        ["validate", "--config", config, "--ckpt_path", str(truncated)],
        ["fit", "--config", config, "--trainer.default_root_dir", str(truncated / "run")],
    ):
        assert main(args) == 2, args
        err = ours(capsys.readouterr().err)
        assert len(err) == 1 and err[0].startswith("pi0-lightning: error: "), err
    with pytest.raises(SystemExit) as e:  # a config error: its message first, a hint after it, no usage dump
        main(["fit", "--config", config, "--trainer.max_epochs", "many"])
    err = ours(capsys.readouterr().err)
    assert e.value.code == 2 and err[0].startswith("pi0-lightning: error: ") and len(err) <= 12, err
    (again,) = runs(tmp_path)
    assert (again.info.status, again.info.end_time) == ("FINISHED", first.info.end_time)

    # validate a checkpoint: into its run, at its step, labelled with the iterations it was trained for
    fit_val = history(tmp_path, first.info.run_id, "val/success_rate")
    assert main(["validate", "--config", config, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]) == 0
    assert len(runs(tmp_path)) == 1
    val = history(tmp_path, first.info.run_id, "val/success_rate")
    assert len(val) == 2 and val[1][0] == fit_val[0][0] > 0
    assert sorted(p.name for p in (run / "videos").iterdir()) == ["iteration_0001"]

    # a fresh fit is a new run, in a directory of its own; the initial weights are validated only when asked, in a
    # run of their own
    last = (run / "checkpoints" / "last.ckpt").read_bytes()
    assert main(["fit", "--config", config]) == 2
    assert "holds the checkpoints of an earlier run" in capsys.readouterr().err
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == last and len(runs(tmp_path)) == 1
    assert main(["fit", "--config", config, "--trainer.default_root_dir", str(tmp_path / "run2")]) == 0
    assert main(["validate", "--config", config, "--initial_weights", "true"]) == 0
    all_runs = runs(tmp_path)
    assert len(all_runs) == 3 and all_runs[1].info.run_id != first.info.run_id
    assert "-validate-" in all_runs[2].info.run_name
    assert [s for s, _ in history(tmp_path, all_runs[2].info.run_id, "val/success_rate")] == [0]
    assert (run / "videos" / "iteration_0000").is_dir()

    # make compare: one row per run, the fits count one finished iteration each
    from pi0_lightning.compare import main as compare

    capsys.readouterr()
    assert compare(["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--experiment", "test"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    rows = [r.split("|")[1:-1] for r in lines if r.startswith("| test")]
    names = [r[1].strip() for r in rows]
    assert len(rows) == 3 and len(set(names)) == 3
    iterations = sorted(r[header.index("iterations")].strip() for r in rows)
    assert iterations == ["-", "1", "1"]


def test_resume_after_kill_continues_iteration_optimizer_sampler_and_mlflow_run(tmp_path):
    config = str(write_config(tmp_path, epochs=3))
    run = tmp_path / "run"
    proc = cli(["fit", "--config", config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_iteration(proc, run / "rollout_stats.jsonl", 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 0 and ckpt["optimizer_states"] and ckpt["mlflow"]["run_id"]
    sampler = ckpt["RolloutDataModule"]["samplers"][0]
    assert sampler["position"] > 0 and sampler["history"]
    resumed = cli(["fit", "--config", config, "--ckpt_path", "last"], stdout=subprocess.DEVNULL)
    assert resumed.wait(timeout=600) == 0
    iterations = [json.loads(line)["iteration"] for line in (run / "rollout_stats.jsonl").read_text().splitlines()]
    assert iterations[-2:] == [1, 2]  # the killed iteration 1 runs again, then 2
    final = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["epoch"] == 2 and final["global_step"] > ckpt["global_step"]
    assert final["mlflow"]["run_id"] == ckpt["mlflow"]["run_id"]
    (only,) = runs(tmp_path)
    assert only.info.status == "FINISHED"
    assert_each_step_once(tmp_path, only.info.run_id, 3)


def test_preemption_signal_stops_requeues_and_resumes(tmp_path):
    config = str(write_config(tmp_path, epochs=2))
    run = tmp_path / "run"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = cli(["fit", "--config", config, "--ckpt_path", "last"], env=slurm, stderr=subprocess.PIPE, text=True)
    wait_for_iteration(proc, run / "rollout_stats.jsonl", 1)
    stopped = time.time()
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR1, err
    assert time.time() - stopped < 60  # stopped within a step, not after the iteration
    assert log.read_text().strip() == "requeue 4242"
    assert "SIGUSR1 received" in err and "resume with --ckpt_path last" in err
    (killed,) = runs(tmp_path)
    assert killed.info.status == "KILLED"
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["epoch"] == 0
    # the requeued job runs the same command
    assert cli(["fit", "--config", config, "--ckpt_path", "last"], env=slurm).wait(timeout=600) == 0
    (done,) = runs(tmp_path)
    assert done.info.status == "FINISHED" and done.info.run_id == killed.info.run_id
    assert_each_step_once(tmp_path, done.info.run_id, 2)
