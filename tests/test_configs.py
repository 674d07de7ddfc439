"""Every YAML in configs/ parses against the current code (LightningCLI --print_config): the standalone configs
alone (the top level, the LIBERO learning proofs' stages, the base experiment, the PI0 SFT config), the experiment
overrides on top of the shared base, the SFT overrides on top of the PI0 SFT config, the trainer fragments on top of
the demo."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pi0_lightning.cli import TRAINER_DEFAULTS, PI0LightningCLI
from pi0_lightning.lit.datamodule import RolloutDataModule
from pi0_lightning.lit.module import PI0RLModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BASE = CONFIGS / "experiments" / "base.yaml"
STANDALONE = sorted(
    [*CONFIGS.glob("*.yaml"), *CONFIGS.glob("libero_*/*.yaml"), BASE, CONFIGS / "sft" / "pi0_libero.yaml"]
)
OVERRIDES = sorted(p for p in (CONFIGS / "experiments").glob("*.yaml") if p != BASE)
FRAGMENTS = sorted((CONFIGS / "trainer").glob("*.yaml"))
SFT = CONFIGS / "sft" / "pi0_libero.yaml"
SFT_OVERRIDES = sorted(p for p in (CONFIGS / "sft").glob("*.yaml") if p != SFT)


def print_config(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        PI0LightningCLI(PI0RLModule, RolloutDataModule, trainer_defaults=TRAINER_DEFAULTS, args=args)
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("path", STANDALONE, ids=lambda p: p.name)
def test_standalone_config_parses(path, capsys):
    cfg = print_config(["fit", "--config", str(path), "--print_config"], capsys)
    data = cfg["data"]["init_args"]
    assert data["replan_steps"] == 5 and cfg["model"]["algorithm"]["name"] in ("cfg", "loop", "sft")


@pytest.mark.parametrize("path", OVERRIDES, ids=lambda p: p.name)
def test_experiment_override_composes_with_the_base(path, capsys):
    cfg = print_config(["fit", "--config", str(BASE), "--config", str(path), "--print_config"], capsys)
    override = yaml.safe_load(path.read_text())
    assert cfg["trainer"]["default_root_dir"] == override["trainer"]["default_root_dir"] != "runs/pi0_libero_spatial"
    suite = override.get("data", {}).get("env", {}).get("suite", "libero_spatial")
    data = cfg["data"]["init_args"]
    assert data["env"]["suite"] == suite and data["sampling"]["group_size"] == 8
    if "algorithm" in override.get("model", {}):  # PI0-FAST: the base's CFG settings are replaced, not merged
        assert cfg["model"]["algorithm"] == {"name": "loop", **override["model"]["algorithm"]["init_args"]}


@pytest.mark.parametrize("path", SFT_OVERRIDES, ids=lambda p: p.name)
def test_sft_override_composes_with_the_pi0_sft_config(path, capsys):
    cfg = print_config(["fit", "--config", str(SFT), "--config", str(path), "--print_config"], capsys)
    assert cfg["data"]["class_path"].endswith("DemoDataModule") and cfg["model"]["algorithm"]["name"] == "sft"
    assert cfg["model"]["action_horizon"] == 10 and cfg["data"]["init_args"]["dataset"]["episodes_per_task"] == 10
    assert cfg["trainer"]["default_root_dir"] == yaml.safe_load(path.read_text())["trainer"]["default_root_dir"]


@pytest.mark.parametrize("path", FRAGMENTS, ids=lambda p: p.name)
def test_trainer_fragment_composes_with_the_demo(path, capsys):
    cfg = print_config(["fit", "--config", str(CONFIGS / "demo.yaml"), "--config", str(path), "--print_config"], capsys)
    assert cfg["trainer"]["default_root_dir"] == "runs/demo"


def test_all_configs_found():
    assert len(STANDALONE) == 10 and len(OVERRIDES) == 4 and len(FRAGMENTS) >= 4 and len(SFT_OVERRIDES) == 2
