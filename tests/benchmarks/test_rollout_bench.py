"""The end-to-end rollout benchmark: a CPU smoke run with the tiny model on real LIBERO, and its CUDA guard."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("libero.libero", reason="LIBERO is not installed (pip install 'pi0-lightning[libero]')")

from pi0_lightning.benchmarks.rollout import main  # noqa: E402


def test_cpu_smoke_on_real_libero(tmp_path, capsys):
    out = tmp_path / "rollout.json"
    argv = ["--phase", "e2e", "--variant", "pi0_tiny", "--device", "cpu", "--workers", "1", "--max-steps", "5"]
    results = main([*argv, "--out", str(out)])
    (row,) = results["e2e"]
    assert row["episodes"] == 1 and row["invalid"] == 0
    assert row["env_steps"] == 5 and row["policy_calls"] == 1  # 5 steps, replanning every 5: one chunk
    assert row["steps_per_s"] > 0 and 0 < row["policy_share"] < 1 and row["reset_s"] > 0
    assert "| workers | episodes | env steps |" in capsys.readouterr().out
    assert json.loads(out.read_text())["e2e"][0]["env_steps"] == 5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_requested_without_a_gpu_is_a_clear_error():
    with pytest.raises(SystemExit, match="no CUDA device"):
        main(["--device", "cuda"])


def test_prepare_phase_times_the_policy_inputs(capsys):
    results = main(["--phase", "prepare", "--variant", "pi0_tiny", "--device", "cpu", "--workers", "1", "4"])
    rows = results["prepare"]
    assert [r["batch"] for r in rows] == [1, 4]
    assert all(r["prepare_ms"] > 0 and r["to_observation_ms"] > 0 for r in rows)
    assert "| batch | prepare (ms) | to_observation (ms) |" in capsys.readouterr().out
