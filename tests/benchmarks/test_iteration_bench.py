"""The iteration benchmark's per-mode config: the experiment config with random weights, the mode, no logger or
videos, one validation at the end, a single kept checkpoint; and its one-line errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from pi0_lightning.benchmarks.iteration import main, mode_config

BASE = Path(__file__).parents[2] / "configs" / "experiments" / "base.yaml"


def test_mode_config_changes_only_what_the_benchmark_needs(tmp_path):
    base = yaml.safe_load(BASE.read_text())
    args = argparse.Namespace(iterations=3, accelerator="gpu", variant="pi0", workers=16, eval_episodes=2)
    config = mode_config(base, "lora", args, tmp_path)
    trainer, model, data = config["trainer"], config["model"], config["data"]
    assert (trainer["max_epochs"], trainer["check_val_every_n_epoch"], trainer["logger"]) == (3, 3, False)
    assert trainer["default_root_dir"] == str(tmp_path / "lora")
    names = [c["class_path"].rsplit(".", 1)[-1] for c in trainer["callbacks"]]
    assert (
        names.count("ModelCheckpoint") == 1 and "RolloutVideoLogger" not in names and "SafetensorsExport" not in names
    )
    assert names[-1] == "RolloutStatsWriter" and names.count("RolloutStatsWriter") == 1
    kept = next(c for c in trainer["callbacks"] if c["class_path"].endswith("ModelCheckpoint"))["init_args"]
    assert (kept["save_top_k"], kept["save_last"], kept["monitor"]) == (1, False, "step")
    assert (model["checkpoint"], model["variant"], model["trainable"]) == (None, "pi0", "lora")
    assert model["cuda_graphs"] is True and model["optim"] == base["model"]["optim"]  # the rest as configured
    assert data["env"]["num_workers"] == 16 and data["env"]["suite"] == base["data"]["env"]["suite"]
    assert data["sampling"]["dynamic_sampling"] is False and data["sampling"]["group_size"] == 8
    assert (data["eval_episodes"], data["video_episodes"]) == (2, 0)
    assert base["trainer"]["logger"] != False  # noqa: E712 - the base config itself is untouched
    cpu = mode_config(base, "full", argparse.Namespace(**{**vars(args), "accelerator": "cpu"}), tmp_path)["model"]
    assert (cpu["cuda_graphs"], cpu["compile"], cpu["model_dtype"]) == (False, False, "float32")


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--config", "missing.yaml"], "config missing.yaml not found"), (["--iterations", "0"], "at least 1")],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--root", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "runs").exists()
