"""Per-task success rates as a torchmetrics Metric, so that `compute()` sums over distributed ranks."""

from __future__ import annotations

import torch
from torchmetrics import Metric

from pi0_lightning.rollout.types import EpisodeResult


class TaskSuccessRate(Metric):
    """Counts successes and valid episodes per task id; `compute()` returns per-task rates (NaN if no episode)."""

    full_state_update = False

    def __init__(self, num_tasks: int, **kwargs):
        super().__init__(**kwargs)
        self.num_tasks = num_tasks
        self.add_state("successes", default=torch.zeros(num_tasks, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("episodes", default=torch.zeros(num_tasks, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, task_ids: torch.Tensor, success: torch.Tensor) -> None:
        task_ids = task_ids.long().to(self.successes.device)
        self.successes.index_add_(0, task_ids, success.to(self.successes))
        self.episodes.index_add_(0, task_ids, torch.ones_like(task_ids, dtype=self.episodes.dtype))

    def compute(self) -> dict[str, torch.Tensor]:
        rates = self.successes / self.episodes  # NaN where a task had no episode
        overall = self.successes.sum() / self.episodes.sum().clamp(min=1)
        return {"per_task": rates, "overall": overall, "episodes": self.episodes, "successes": self.successes}


def count_episodes(metric: TaskSuccessRate, results: list[EpisodeResult]) -> None:
    """Every requested episode counts (filler episodes aside); one that did not finish counts as a failure."""
    real = [r for r in results if not r.request.pad]
    if real:
        metric.update(
            torch.tensor([r.request.task_id for r in real]), torch.tensor([float(r.valid and r.success) for r in real])
        )
