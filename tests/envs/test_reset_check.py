"""Soft versus hard LIBERO resets on CPU (one task, two init states, a few steps): identical with LiberoEnv's clearing
of the gripper command, different without it; bad input is one line and exit 2."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("libero.libero", reason="LIBERO is not installed (pip install 'pi0-lightning[libero]')")

from pi0_lightning.envs.reset_check import QUANTITIES, check_task, main  # noqa: E402


def test_soft_reset_after_another_episode_is_bit_identical_to_a_hard_reset(tmp_path, capsys):
    out = tmp_path / "report.json"
    argv = ["--suites", "libero_spatial", "--tasks", "0", "--init-states", "2", "--steps", "3", "--out", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[1].split()[:5] == ["libero_spatial", "2", "2", "0", "0"]
    report = json.loads(out.read_text())
    assert report["quantities"] == list(QUANTITIES) and report["steps"] == 3 and not report["raw_soft_reset"]
    (suite,) = report["reports"]
    assert suite["suite"] == "libero_spatial" and suite["pairs"] == 2 and suite["identical"] == 2
    assert suite["errors"] == 0 and suite["first_quantities"] == {} and suite["max_abs_diff"] == {}
    assert [(r["task_id"], r["init_state"]) for r in suite["results"]] == [(0, 0), (0, 1)]
    for r in suite["results"]:
        assert r["identical"] and r["first_quantity"] is None and r["differences"] == {} and r["error"] is None


def test_robosuite_soft_reset_carries_the_gripper_command_into_the_next_episode():
    """Without the clearing, the previous episode's closing command drives the fingers from the first wait step."""
    (r,) = check_task("libero_spatial", 0, [0], steps=0, raw_soft_reset=True)
    assert not r.identical and r.error is None
    assert r.first_step == 1 and r.first_at == "wait step 1" and r.first_quantity == "qpos"
    assert r.differences["ctrl"].first_step == 1 and r.differences["gripper_qpos"].max_abs_diff > 1e-4
    assert "body_pos" not in r.differences and "time" not in r.differences  # same layout and clock


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--suites", "libero_nope"], "unknown LIBERO suite 'libero_nope'"),
        (["--suites", "libero_spatial", "--tasks", "12"], "tasks 0..9"),
        (["--suites", "libero_spatial", "--init-states", "0"], "--init-states must be at least 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
