"""Supervised fine-tuning through `pi0-lightning fit`: a tiny dataset written on the fly in LeRobot format, its norm
stats, a tiny model that overfits it (PI0 flow matching and PI0-FAST cross-entropy), validation by held-out loss and
by rollouts, and datasets that cannot work (one line, exit 2, nothing created)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pi0_lightning.cli import main
from pi0_lightning.data.lerobot_writer import DemoEpisode, write_lerobot_dataset
from pi0_lightning.data.norm_stats import main as norm_stats_main
from pi0_lightning.envs.reach import TASKS

pytestmark = pytest.mark.slow
H = 4
ROOT = Path(__file__).resolve().parents[2]


def demos(n_per_task: int = 6, length: int = 8, size: int = 32) -> list[DemoEpisode]:
    """Each task's demonstrations hold one action (a tiny model can memorise it); images differ per task (colour)."""
    rng = np.random.default_rng(0)
    out = []
    for task in range(2):
        actions = np.repeat(rng.uniform(-1, 1, (1, 7)), length, 0).astype(np.float32)
        for k in range(n_per_task):
            colour = np.array([200 * (task == 0), 200 * (task == 1), 40 * k], dtype=np.uint8)
            images = np.broadcast_to(colour, (length, size, size, 3)).copy()
            state = np.zeros((length, 8), dtype=np.float32)
            state[:, :2] = rng.uniform(-0.3, 0.3, 2)
            state[:, 2] = np.linspace(-1, 1, length)  # the step is observable: each sample's chunk is determined
            out.append(DemoEpisode(images, images.copy(), state, actions, TASKS[task]))
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("demos") / "lerobot"
    write_lerobot_dataset(root, demos(), version="v3.0", image_storage="image")
    assert norm_stats_main([str(root), "--model", "pi0", "--horizon", str(H)]) == 0
    return root


def write_config(
    tmp_path, dataset, model: dict, epochs: int, env: dict | None = None, workers: int = 2, **dataset_args
) -> str:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": epochs,
            "check_val_every_n_epoch": epochs,
            "default_root_dir": str(tmp_path / "run"),
            "enable_progress_bar": False,
            "logger": [
                {
                    "class_path": "pi0_lightning.lit.logger.MLflowLogger",
                    "init_args": {"experiment_name": "sft", "db": str(tmp_path / "mlflow.db")},
                }
            ],
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
                {"class_path": "pi0_lightning.callbacks.MLflowRun"},
                {"class_path": "pi0_lightning.callbacks.SafetensorsExport"},
            ],
        },
        "model": {**model, "algorithm": {"name": "sft"}, "delta_actions": True},  # as the norm stats (--model pi0)
        "data": {
            "class_path": "pi0_lightning.lit.demo_datamodule.DemoDataModule",
            "init_args": {
                "dataset": {"path": str(dataset), "val_episodes_per_task": 1, **dataset_args},
                "env": env,
                "batch_size": 16,
                "num_workers": workers,
                "eval_episodes": 4,
                "replan_steps": H,
                "progress": False,
            },
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def losses(tmp_path, key: str) -> list[float]:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("sft").experiment_id])
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


def test_pi0_overfits_a_few_demonstrations_and_validates(tmp_path, dataset):
    optim = {"lr": 3e-3, "warmup_steps": 5, "decay_steps": 500, "min_lr": 3e-4}
    model = {"variant": "pi0_micro", "action_horizon": H, "optim": optim}
    env = {"name": "reach", "tasks": "0,1", "num_workers": 2}
    # in-process loading (workers are tested in tests/data): 100 epochs of 5 batches without worker start-ups
    config = write_config(tmp_path, dataset, model, epochs=100, env=env, workers=0, augment={"enabled": False})
    assert main(["fit", "--config", config]) == 0
    train = losses(tmp_path, "train/loss")
    assert len(train) == 100 * 5  # 2 tasks x 5 training episodes (1 each held out) x 8 steps = 5 batches of 16
    assert np.mean(train[-20:]) < 0.4 * np.mean(train[:20]), (train[:20], train[-20:])
    assert losses(tmp_path, "val/loss") and losses(tmp_path, "val/success_rate")
    export = tmp_path / "run" / "export"
    # overfit: the exported policy's sampled chunks reproduce the demonstrated ones
    from pi0_lightning.data.demos import DemoDataConfig, DemoDataset, open_source, select_episodes, supervised_collate
    from pi0_lightning.policy.loading import load_policy

    policy = load_policy(export)
    assert policy.model.cfg_embed is None  # a plain policy: RL adds its embedding later
    inputs = policy.inputs_only()
    source = open_source(DemoDataConfig(path=str(dataset)))
    trained, _ = select_episodes(source, None, val_per_task=1)  # the episodes the run trained on
    batch = supervised_collate(list(DemoDataset(source, trained, inputs, H)), inputs)
    noise = torch.randn(batch["actions"].shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sampled = policy.model.sample_actions(batch["obs"], noise=noise, num_steps=10)[..., :7]
    target = batch["actions"][..., :7]
    error = (sampled - target).pow(2).mean().item()
    assert error < 0.5 * target.pow(2).mean().item(), (error, target.pow(2).mean().item())
    bundled = (export / "norm_stats.json").read_text()
    assert bundled.replace(" ", "").replace("\n", "") == (dataset / "norm_stats.json").read_text().replace(
        " ", ""
    ).replace("\n", "")


def test_pi0_fast_loss_falls(tmp_path, dataset):
    model = {"variant": "pi0_fast_micro", "action_horizon": H, "optim": {"lr": 3e-3, "warmup_steps": 5}}
    config = write_config(tmp_path, dataset, model, epochs=15)
    assert main(["fit", "--config", config]) == 0
    train = losses(tmp_path, "train/loss")
    assert np.mean(train[-3:]) < 0.5 * np.mean(train[:3]), (train[:3], train[-3:])
    assert losses(tmp_path, "val/loss")


def test_bad_datasets_fail_in_one_line(tmp_path, dataset, capsys):
    model = {"variant": "pi0_micro", "action_horizon": H}
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ({"path": str(tmp_path / "missing")}, "does not exist"),
        ({"path": str(empty)}, "meta/info.json"),
        ({"keys": {"image": "observation.images.top"}}, "observation.images.top"),
        ({"episodes_per_task": 0}, "no training episodes"),
    ]
    for args, message in cases:
        ds = args.pop("path", str(dataset))
        config = write_config(tmp_path, ds, model, epochs=1, **args)
        assert main(["fit", "--config", config]) == 2, args
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pi0-lightning")]
        assert len(err) == 1 and message in err[0], (message, err)
    assert sorted(os.listdir(tmp_path)) == ["config.yaml", "empty"]  # no run directory, no MLflow store


def test_two_process_ddp_shards_the_demonstrations(tmp_path, dataset):
    model = {"variant": "pi0_micro", "action_horizon": H}
    config = write_config(tmp_path, dataset, model, epochs=2, workers=1)
    ddp = str(ROOT / "configs" / "trainer" / "cpu_ddp.yaml")
    args = [sys.executable, "-m", "pi0_lightning.cli", "fit", "--config", config, "--config", ddp]
    assert subprocess.run(args, cwd=ROOT, timeout=600).returncode == 0
    # 80 training samples split over 2 ranks: 40 each, 2 batches of 16 (the last partial one dropped), 2 epochs
    assert len(losses(tmp_path, "train/loss")) == 4
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()
