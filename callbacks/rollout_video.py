"""Rollout videos of a few validation episodes per iteration, written as mp4 and logged to MLflow (rank 0). Frames are
shown upright whether the env workers sent raw renders or images they prepared for the policy (the data module's
`env_image_size`; `evaluate.video_frame`)."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from pi0_lightning.callbacks.paths import under_root


class RolloutVideoLogger(L.Callback):
    def __init__(self, dirpath: str | None = None, max_videos: int = 4, fps: int = 10):
        """
        Args:
            dirpath: where mp4s are written, in iteration_NNNN/ subfolders (N = RL iterations trained; default:
                <root dir>/videos).
            max_videos: videos per validation run.
            fps: frames per second.
        """
        self.given = dirpath
        self.dirpath = Path(dirpath) if dirpath else None
        self.max_videos = max_videos
        self.fps = fps

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.dirpath = under_root(trainer, self.given, "videos")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        episodes = list(getattr(pl_module, "val_episodes", []))[: self.max_videos]
        if not trainer.is_global_zero or not episodes:
            return
        from lightning.pytorch.loggers import MLFlowLogger

        from pi0_lightning.callbacks.mlflow_run import iterations_trained
        from pi0_lightning.evaluate import write_videos

        folder = f"iteration_{iterations_trained(trainer, pl_module):04d}"
        prepared = getattr(getattr(trainer, "datamodule", None), "env_image_size", None) is not None
        paths = write_videos(episodes, self.dirpath / folder, fps=self.fps, prepared=prepared)
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                for p in paths:
                    logger.experiment.log_artifact(logger.run_id, str(p), f"videos/{folder}")
