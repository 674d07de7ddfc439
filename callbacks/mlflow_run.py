"""MLflow run bookkeeping: the run id inside every checkpoint (so resuming or validating a checkpoint finds its run),
the resolved config, the simulator stack, and the success rate over iterations."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger

from pi0_lightning.callbacks.paths import under_root


def _mlflow(trainer: L.Trainer) -> MLFlowLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)


def iterations_trained(trainer: L.Trainer, pl_module: L.LightningModule) -> int:
    """RL iterations whose training is in the weights being validated (0: the initial weights)."""
    return int(getattr(pl_module, "iterations_trained", trainer.current_epoch))


class MLflowRun(L.Callback):
    """Writes {run_id, tracking_uri} into every Lightning checkpoint (`pi0-lightning` continues that run when it
    resumes or validates the checkpoint), and logs the resolved config.yaml as an artifact and, for
    LIBERO, the simulator stack (`sim/mujoco`, `sim/robosuite`, `sim/robot_model`, `sim/libero_package`,
    `sim/render_backend`) as parameters.

    For `validate` it also restores the checkpoint's iteration and step counters, which Lightning leaves at 0 outside
    `fit`, so the results land at the checkpoint's step of its run."""

    def __init__(self, config_file: str | None = None):
        """
        Args:
            config_file: the resolved config to log as an artifact (default: <log_dir>/config.yaml).
        """
        self.config_file = config_file

    def _record(self, trainer: L.Trainer) -> None:
        # after every setup() hook, so LightningCLI's SaveConfigCallback has written config.yaml
        logger = _mlflow(trainer)
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if logger is None or not trainer.is_global_zero:
            return
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

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn != "validate":
            return
        from pi0_lightning.lit.checkpoints import is_iteration_end

        fit = checkpoint.get("loops", {}).get("fit_loop", {})
        stepped = fit.get("epoch_loop.state_dict", {}).get("_batches_that_stepped")
        if stepped is not None:
            # fit logs validation before it counts the epoch's last batch; a checkpoint written at the iteration's
            # end has counted it, so step back one to land on the step fit's own validation used
            end = is_iteration_end(checkpoint)
            trainer.fit_loop.epoch_loop._batches_that_stepped = max(0, stepped - 1) if end else stepped
        trainer.fit_loop.epoch_progress.current.completed = checkpoint.get("epoch", 0)


class SuccessRatePlot(L.Callback):
    """Plot rollout success (every iteration) and val/success_rate (every validation) against the RL iterations
    trained (0 = the initial weights) to success_rate.png after each validation and at the end of fit, and log it to
    MLflow (rank 0)."""

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

    def _record(self, trainer: L.Trainer, key: str, x: int) -> None:
        if key in trainer.callback_metrics:
            # one point per x: validating a checkpoint again replaces its point
            points = [p for p in self.history.get(key, []) if p[0] != x]
            self.history[key] = sorted([*points, (x, float(trainer.callback_metrics[key]))])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # rollouts of iteration k ran with the weights of k trained iterations
        if trainer.is_global_zero:
            self._record(trainer, "rollout/success_rate", trainer.current_epoch)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        self._record(trainer, "val/success_rate", iterations_trained(trainer, pl_module))
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
        ax.set_xlabel("RL iterations trained")
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
