"""`python -m pi0_lightning.evaluate` end to end on real LIBERO with a converted openpi fixture checkpoint."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("libero.libero", reason="LIBERO is not installed (pip install 'pi0-lightning[libero]')")

from pi0_lightning.evaluate import main  # noqa: E402


def test_evaluation_table_from_converted_fixture(converted, tmp_path):
    out = tmp_path / "eval"
    argv = ["--checkpoint", str(converted("pi0_tiny")), "--suite", "libero_spatial", "--tasks", "0", "--episodes", "2"]
    argv += ["--workers", "1", "--max-steps", "6", "--video", "1", "--train-small-tokenizer", "--out", str(out)]
    argv += ["--device", "cpu"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["suite"] == "libero_spatial" and res["episodes"] == 2 and res["invalid_episodes"] == 0
    task = res["tasks"][0]
    assert task["task_id"] == 0 and task["episodes"] == 2 and task["successes"] == 0  # random weights never succeed
    assert res["stats"]["env_steps"] == 12
    assert "| 0 | pick up the black bowl" in (out / "results.md").read_text()
    assert len(list((out / "videos").glob("*.mp4"))) == 1


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [("--suite", "libero_nope", "valid suites"), ("--tasks", "make coffee", "valid tasks")],
)
def test_bad_names_exit_2_with_the_valid_ones(converted, tmp_path, capsys, flag, value, needle):
    argv = ["--checkpoint", str(converted("pi0_tiny")), "--out", str(tmp_path / "o"), flag, value]
    assert main(argv) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
