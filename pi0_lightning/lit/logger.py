"""MLflow logging defaults for pi0_lightning runs.

- The tracking store defaults to a local sqlite database (`sqlite:///<abs path>/mlflow.db`): MLflow >= 3.13 refuses
  the old `./mlruns` file store. `MLFLOW_TRACKING_URI` overrides it (e.g. a team `mlflow server`).
- `run_file` (JSON with run_id and tracking_uri) lets a resumed or requeued job continue the *same* MLflow run:
  `MLflowRunFile` (callbacks/) writes it next to the checkpoints; this logger reads it at start-up.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lightning.pytorch.loggers import MLFlowLogger


def default_tracking_uri(db: str | Path = "runs/mlflow.db") -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    path = Path(db).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


class MLflowLogger(MLFlowLogger):
    def __init__(
        self,
        experiment_name: str | None = None,
        run_name: str | None = None,
        tracking_uri: str | None = None,
        db: str = "runs/mlflow.db",
        run_file: str | None = None,
        tags: dict[str, str] | None = None,
        artifact_location: str | None = None,
        save_dir: str | None = None,
    ):
        """
        Args:
            experiment_name: MLflow experiment (default: the suite, so that each benchmark suite is one experiment).
            run_name: MLflow run name.
            tracking_uri: explicit store; default $MLFLOW_TRACKING_URI, else sqlite at `db`.
            db: sqlite file used when no tracking URI is given.
            run_file: JSON file holding the run id to resume (written by the MLflowRunFile callback; default:
                <trainer root dir>/checkpoints/mlflow_run.json).
            tags: extra run tags.
            artifact_location: where new experiments store artifacts (default: next to the database).
            save_dir: the run's local directory (`trainer.log_dir`: the resolved config.yaml lands there); default:
                the trainer's root directory, filled in by `pi0-lightning`.
        """
        uri = tracking_uri or default_tracking_uri(db)
        run_id = None
        if run_file and Path(run_file).is_file():
            saved = json.loads(Path(run_file).read_text())
            if saved.get("tracking_uri") == uri:
                run_id = saved.get("run_id")
        if artifact_location is None and uri.startswith("sqlite:///"):
            artifact_location = Path(uri.removeprefix("sqlite:///")).parent.joinpath("mlartifacts").as_uri()
        super().__init__(
            experiment_name=experiment_name or "pi0_lightning",
            run_name=run_name,
            tracking_uri=uri,
            tags=tags,
            run_id=run_id,
            artifact_location=artifact_location,
        )
        self.run_file = run_file
        self._local_dir = save_dir

    @property
    def save_dir(self) -> str | None:
        return self._local_dir if self._local_dir is not None else super().save_dir
