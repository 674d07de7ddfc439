"""MLflow logging for pi0_lightning runs.

- The tracking store defaults to a local sqlite database (`sqlite:///<abs path>/mlflow.db`): MLflow >= 3.13 refuses
  the old `./mlruns` file store. `MLFLOW_TRACKING_URI` overrides it (e.g. a team `mlflow server`).
- Run identity: a new run gets a readable unique name (`pi0-lightning` passes `<run dir>-<suite>-<timestamp>`); a run
  continues an existing MLflow run only when `run_id` is given, which `pi0-lightning` takes from the checkpoint it
  resumes or validates (never from a file in the output directory).
- Metrics are held back until the next checkpoint is written (`hold_until_checkpoint`, set by the `Preemption`
  callback when the trainer checkpoints): a run killed mid-iteration has logged nothing of that iteration, so the
  resumed run logs each step exactly once. Lightning logs an epoch's aggregated metrics just after the end-of-epoch
  checkpoint, so after a checkpoint metrics pass straight through until the next iteration starts
  (`iteration_started`). A run that fails drops what it held; one that finishes flushes it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only


def default_tracking_uri(db: str | Path = "runs/mlflow.db", create: bool = True) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    path = Path(db).resolve()
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def timestamped_name(*parts: str | None) -> str:
    """`<parts>-<YYYYmmdd-HHMMSS>`, the name of a new run."""
    return "-".join([p for p in parts if p] + [time.strftime("%Y%m%d-%H%M%S")])


class MLflowLogger(MLFlowLogger):
    def __init__(
        self,
        experiment_name: str | None = None,
        run_name: str | None = None,
        tracking_uri: str | None = None,
        db: str = "runs/mlflow.db",
        run_id: str | None = None,
        tags: dict[str, str] | None = None,
        artifact_location: str | None = None,
        save_dir: str | None = None,
    ):
        """
        Args:
            experiment_name: MLflow experiment (default: the suite, so that each benchmark suite is one experiment).
            run_name: name of a new run (default: `<run dir>-<suite>-<timestamp>`, filled in by `pi0-lightning`).
            tracking_uri: explicit store; default $MLFLOW_TRACKING_URI, else sqlite at `db`.
            db: sqlite file used when no tracking URI is given.
            run_id: continue this MLflow run; `pi0-lightning` sets it from the checkpoint given with `--ckpt_path`.
            tags: extra run tags.
            artifact_location: where new experiments store artifacts (default: next to the database).
            save_dir: the run's local directory (`trainer.log_dir`: the resolved config.yaml lands there); default:
                the trainer's root directory, filled in by `pi0-lightning`.
        """
        uri = tracking_uri or default_tracking_uri(db)
        if artifact_location is None and uri.startswith("sqlite:///"):
            artifact_location = Path(uri.removeprefix("sqlite:///")).parent.joinpath("mlartifacts").as_uri()
        experiment_name = experiment_name or "pi0_lightning"
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name or (None if run_id else timestamped_name(experiment_name)),
            tracking_uri=uri,
            tags=tags,
            run_id=run_id,
            artifact_location=artifact_location,
        )
        self._local_dir = save_dir
        self._reopen = run_id is not None
        self.hold_until_checkpoint = False
        """Hold metrics until the next checkpoint is written (see the module docstring)."""
        self._held: list[tuple[dict[str, float], int | None]] = []
        self._released = False

    @property
    def save_dir(self) -> str | None:
        return self._local_dir if self._local_dir is not None else super().save_dir

    @property
    def experiment(self):
        client = MLFlowLogger.experiment.fget(self)
        if self._reopen and client is not None:  # a resumed run is running again (it may say KILLED or FAILED)
            self._reopen = False
            client.update_run(self._run_id, status="RUNNING")
        return client

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.hold_until_checkpoint and not self._released:
            self._held.append((dict(metrics), step))
        else:
            super().log_metrics(metrics, step)

    @rank_zero_only
    def flush(self) -> None:
        held, self._held = self._held, []
        for metrics, step in held:
            super().log_metrics(metrics, step)

    def iteration_started(self) -> None:
        self._released = False

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        self.flush()
        self._released = True
        super().after_save_checkpoint(checkpoint_callback)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        from pi0_lightning import signals

        if status in ("success", "finished"):
            self.flush()
        else:
            self._held = []  # the unfinished iteration: the resumed run logs it again
        if status == "failed" and signals.stop_requested() is not None:
            status = "KILLED"
        super().finalize(status)
