"""Lightning callbacks for RL runs (installed as `pi0_lightning.callbacks`; reference them by that class_path)."""

from pi0_lightning.callbacks.export import SafetensorsExport
from pi0_lightning.callbacks.mlflow_run import MLflowRun, SuccessRatePlot
from pi0_lightning.callbacks.preemption import Preemption
from pi0_lightning.callbacks.rollout_stats import RolloutStatsWriter
from pi0_lightning.callbacks.rollout_video import RolloutVideoLogger

__all__ = [
    "MLflowRun",
    "Preemption",
    "RolloutStatsWriter",
    "RolloutVideoLogger",
    "SafetensorsExport",
    "SuccessRatePlot",
]
