"""MLflow run bookkeeping: persist the run id (so resumes continue the same run), log the resolved config, and plot
the success rate over iterations."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger

from pi0_lightning.callbacks.paths import under_root


def _mlflow(trainer: L.Trainer) -> MLFlowLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)


class MLflowRunFile(L.Callback):
    """Writes {run_id, tracking_uri} to `path` (point the logger's `run_file` at the same file) and into every
    Lightning checkpoint, and logs the resolved config.yaml as an artifact and, for LIBERO, the simulator stack
    (`sim/mujoco`, `sim/robosuite`, `sim/robot_model`, `sim/libero_package`, `sim/render_backend`) as parameters."""

    def __init__(self, path: str | None = None, config_file: str | None = None):
        """
        Args:
            path: JSON file with the run id, next to the checkpoints (default: <root dir>/checkpoints/mlflow_run.json).
            config_file: the resolved config to log as an artifact (default: <log_dir>/config.yaml).
        """
        self.given = path
        self.path = Path(path) if path else None
        self.config_file = config_file

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.path = under_root(trainer, self.given, "checkpoints", "mlflow_run.json")

    def _record(self, trainer: L.Trainer) -> None:
        # after every setup() hook, so LightningCLI's SaveConfigCallback has written config.yaml
        logger = _mlflow(trainer)
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if logger is None or not trainer.is_global_zero:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"run_id": logger.run_id, "tracking_uri": logger._tracking_uri}) + "\n")
        config = Path(self.config_file) if self.config_file else Path(log_dir or ".") / "config.yaml"
        if config.is_file():
            logger.experiment.log_artifact(logger.run_id, str(config))
        env = getattr(trainer.datamodule, "env_config", None)
        if getattr(env, "name", None) == "libero":
            from pi0_lightning.envs.physics import stack_versions

            stack = stack_versions(getattr(env, "wrist_collision", True))
            logger.log_hyperparams({f"sim/{k}": v for k, v in stack.items()})

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._record(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        logger = _mlflow(trainer)
        if logger is not None:
            checkpoint["mlflow"] = {"run_id": logger.run_id, "tracking_uri": logger._tracking_uri}


class SuccessRatePlot(L.Callback):
    """Plot rollout success (every iteration) and val/success_rate (every validation) to success_rate.png after each
    validation and at the end of fit, and log it to MLflow (rank 0)."""

    def __init__(self, dirpath: str | None = None):
        """
        Args:
            dirpath: where success_rate.png is written (default: the trainer's root directory).
        """
        self.given = dirpath
        self.dirpath = Path(dirpath) if dirpath else None
        self.history: dict[str, list[tuple[int, float]]] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.dirpath = under_root(trainer, self.given)

    def _record(self, trainer: L.Trainer, key: str) -> None:
        if key in trainer.callback_metrics:
            self.history.setdefault(key, []).append((trainer.current_epoch, float(trainer.callback_metrics[key])))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:  # rollout success of this iteration (logged at its start)
            self._record(trainer, "rollout/success_rate")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        self._record(trainer, "val/success_rate")
        self._plot(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.history:
            self._plot(trainer)

    def _plot(self, trainer: L.Trainer) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        for key, points in self.history.items():
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=key)
        ax.set_xlabel("RL iteration")
        ax.set_ylabel("success rate")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if self.history:
            ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / "success_rate.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        logger = _mlflow(trainer)
        if logger is not None:
            logger.experiment.log_artifact(logger.run_id, str(path), "plots")

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = {k: [tuple(p) for p in v] for k, v in state_dict.get("history", {}).items()}
