"""Helpers for the Lightning tests: a tiny reach-task config written with absolute paths under tmp_path."""

from __future__ import annotations

from pathlib import Path

import yaml


def write_config(
    tmp_path: Path, epochs: int = 1, extra_callbacks: list | None = None, model: dict | None = None, **data_overrides
) -> Path:
    run = tmp_path / "run"
    data = {
        "env": {"name": "reach", "num_workers": 4, "start_method": "forkserver"},
        "sampling": {"group_size": 4, "groups_per_rank": 2, "contexts_per_round": 2, "max_rounds": 2},
        "replan_steps": 5,
        "batch_size": 8,
        "eval_episodes": 2,
        "video_episodes": 1,
        "progress": False,
    }
    data.update(data_overrides)
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": epochs,
            "check_val_every_n_epoch": 1,
            "default_root_dir": str(run),
            "enable_progress_bar": False,
            "logger": [
                {
                    "class_path": "pi0_lightning.lit.logger.MLflowLogger",
                    "init_args": {"experiment_name": "test", "db": str(tmp_path / "mlflow.db")},
                },
            ],
            "callbacks": [  # every output under default_root_dir, where the callbacks put it by default
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"save_last": True, "every_n_epochs": 1},
                },
                {"class_path": "pi0_lightning.callbacks.MLflowRun"},
                {"class_path": "pi0_lightning.callbacks.RolloutStatsWriter"},
                {"class_path": "pi0_lightning.callbacks.RolloutVideoLogger"},
                {"class_path": "pi0_lightning.callbacks.SuccessRatePlot"},
                {"class_path": "pi0_lightning.callbacks.SafetensorsExport"},
                *(extra_callbacks or []),
            ],
        },
        "model": model
        or {
            "variant": "pi0_micro",
            "action_horizon": 10,
            "algorithm": {"name": "cfg", "eval_guidance": [1.0, 2.0]},
            "optim": {"lr": 1.0e-3, "warmup_steps": 1},
        },  # fmt: skip
        "data": data,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
