"""What a training algorithm provides, so that the LightningModule holds no algorithm branches.

An algorithm is one dataclass (its fields are the YAML schema under `model.algorithm`, selected by `name`) that
- checks and prepares the model it trains (`prepare_model`: PI0-FAST or not; CFG adds its condition embedding),
- turns the model into the policy that collects rollouts and runs evaluation (`build_policy`), with the setting
  rollouts use (`rollout_setting`) and the settings validation sweeps (`eval_settings`: CFG weights w, or PI0-FAST
  decoding temperatures), applied with `configure_policy`,
- and computes the loss of a batch of training samples (`loss`).

Implementations: `rl.cfg.CFG` (PI0 / PI0.5, advantage-conditioned flow matching), `rl.loop.LOOP` (PI0-FAST,
RLOO + per-token PPO clipping) and `rl.sft.SFT` (supervised fine-tuning on demonstrations, either model).
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch

from pi0_lightning.model.speed import SpeedConfig
from pi0_lightning.policy.loading import PolicyAssets
from pi0_lightning.rollout.types import ChunkPolicy


class Algorithm(Protocol):
    name: str
    fast: ClassVar[bool | None]
    """Trains PI0-FAST (token policy) rather than PI0 / PI0.5 (flow policy); None: either."""
    setting_name: ClassVar[str]
    """What `rollout_setting` / `eval_settings` values are, for progress labels ("w", "T")."""

    def prepare_model(self, model: torch.nn.Module) -> None: ...

    def build_policy(
        self, model: torch.nn.Module, assets: PolicyAssets, device: torch.device, speed: SpeedConfig | None
    ) -> ChunkPolicy:
        """The chunk policy over `model` (no copy); `speed` as installed (`model/speed.py`), for its CUDA graphs."""

    def rollout_setting(self) -> float: ...

    def eval_settings(self) -> list[tuple[str, float]]:
        """(metric suffix, value) per validation pass; the first is logged as val/success_rate."""

    def configure_policy(self, policy: ChunkPolicy, value: float) -> None: ...

    def loss(
        self, model: torch.nn.Module, batch: dict[str, Any], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


def default_algorithm(fast: bool) -> Algorithm:
    from pi0_lightning.rl.cfg import CFG
    from pi0_lightning.rl.loop import LOOP

    return LOOP() if fast else CFG()


def check_algorithm(algorithm: Algorithm, fast: bool) -> None:
    """One line when the algorithm does not train this kind of model."""
    if algorithm.fast is not None and algorithm.fast != fast:
        raise ValueError(
            "PI0-FAST trains with algorithm {name: loop} (or sft); PI0 / PI0.5 with algorithm {name: cfg} (or sft)"
            f" (got {algorithm.name} for a {'PI0-FAST' if fast else 'PI0'} model)"
        )
