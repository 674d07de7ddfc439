"""The rollout benchmark: a CPU smoke run with the tiny model on real LIBERO, its CUDA guard, the input preparation
phase, and lockstep versus pipelined collection on the paced reach env."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from pi0_lightning.benchmarks.rollout import main

needs_libero = pytest.mark.skipif(
    importlib.util.find_spec("libero") is None, reason="LIBERO is not installed (pip install 'pi0-lightning[libero]')"
)


@needs_libero
def test_cpu_smoke_on_real_libero(tmp_path, capsys):
    out = tmp_path / "rollout.json"
    argv = ["--phase", "e2e", "--variant", "pi0_tiny", "--device", "cpu", "--workers", "1", "--max-steps", "5"]
    results = main([*argv, "--out", str(out)])
    (row,) = results["e2e"]
    assert row["episodes"] == 1 and row["invalid"] == 0 and row["env_images"] == "prepared"
    assert row["env_steps"] == 5 and row["policy_calls"] == 1  # 5 steps, replanning every 5: one chunk
    assert row["steps_per_s"] > 0 and 0 < row["policy_share"] < 1 and row["reset_s"] > 0
    assert "| workers | groups | episodes | env steps |" in capsys.readouterr().out
    assert json.loads(out.read_text())["e2e"][0]["env_steps"] == 5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_requested_without_a_gpu_is_a_clear_error():
    with pytest.raises(SystemExit, match="no CUDA device"):
        main(["--device", "cuda"])


@needs_libero
@pytest.mark.parametrize(("variant", "size"), [("pi0_tiny", 224), ("pi0_micro", 112)])
def test_prepare_phase_times_the_policy_inputs(capsys, variant, size):
    results = main(["--phase", "prepare", "--variant", variant, "--device", "cpu", "--workers", "1", "4"])
    rows = results["prepare"]
    assert [r["batch"] for r in rows] == [1, 4] and all(r["image_size"] == size for r in rows)
    assert all(r["prepare_ms"] > 0 and r["prepare_ms_prepared"] > 0 and r["to_observation_ms"] > 0 for r in rows)
    assert all(r["identical_inputs"] and r["env_prepare_ms"] > 0 for r in rows)
    # one observation through a pipe: two uint8 images and a little proprio (and the flag)
    assert all(256 * 256 * 6 < r["bytes_raw"] < 256 * 256 * 6 + 1000 for r in rows)
    assert all(size * size * 6 < r["bytes_prepared"] < size * size * 6 + 1000 for r in rows)
    out = capsys.readouterr().out
    assert "| batch | images | prepare (ms) | to_observation (ms) | per observation (ms) | pickled bytes" in out
    assert f"| 4 | prepared {size} |" in out and "env-prepared inputs identical to raw-render inputs: True" in out


def test_reach_phase_compares_lockstep_and_pipelined_collection(tmp_path, capsys):
    argv = ["--phase", "reach", "--workers", "3", "--groups", "1", "2", "--max-steps", "12"]
    argv += ["--episodes-per-worker", "2", "--step-ms", "2", "--reset-ms", "5", "--policy-ms", "2"]
    argv += ["--policy-ms-per-row", "1", "--out"]
    rows = main([*argv, str(tmp_path / "reach.json")])["reach"]
    assert [(r["workers"], r["groups"]) for r in rows] == [(3, 1), (3, 2)]
    lockstep, pipelined = rows
    assert lockstep["episodes"] == pipelined["episodes"] == 6 and lockstep["invalid"] == pipelined["invalid"] == 0
    assert pipelined["outcomes"] == lockstep["outcomes"] and pipelined["env_steps"] == lockstep["env_steps"] > 0
    assert pipelined["mean_batch"] <= 2 and lockstep["policy_calls"] > 0  # groups of 2 and 1 workers
    out = capsys.readouterr().out
    assert "| workers | groups | episodes | env steps | wall (s) | env steps/s | vs lockstep |" in out
    assert "per-episode outcomes identical across group counts: True" in out
    assert json.loads((tmp_path / "reach.json").read_text())["reach"][1]["groups"] == 2
