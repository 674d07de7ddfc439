"""Every YAML in configs/ parses against the current code (LightningCLI --print_config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pi0_lightning.cli import TRAINER_DEFAULTS, PI0LightningCLI
from pi0_lightning.lit.datamodule import RolloutDataModule
from pi0_lightning.lit.module import PI0RLModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = sorted(p for p in CONFIGS.rglob("*.yaml") if "trainer" not in p.parts)
FRAGMENTS = sorted((CONFIGS / "trainer").glob("*.yaml"))


def print_config(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        PI0LightningCLI(PI0RLModule, RolloutDataModule, trainer_defaults=TRAINER_DEFAULTS, args=args)
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_config_parses(path, capsys):
    out = print_config(["fit", "--config", str(path), "--print_config"], capsys)
    assert "model:" in out and "data:" in out and "replan_steps: 5" in out


@pytest.mark.parametrize("path", FRAGMENTS, ids=lambda p: p.name)
def test_trainer_fragment_composes_with_the_demo(path, capsys):
    out = print_config(["fit", "--config", str(CONFIGS / "demo.yaml"), "--config", str(path), "--print_config"], capsys)
    assert "trainer:" in out


def test_all_configs_found():
    assert len(EXPERIMENTS) >= 6 and len(FRAGMENTS) >= 4
