"""LOOP (RIPT's RL for token policies such as PI0-FAST): RLOO advantages + the PPO clipped ratio per token.

For every action token j of a rollout with advantage A (its episode's RLOO advantage, shared by its tokens):
    r_j = exp(log pi_theta(a_j | ...) - log pi_old(a_j | ...)),
    L_j = max(-A r_j, -A clip(r_j, 1 - eps_low, 1 + eps_high)),
averaged over all valid action tokens of the batch (token-level averaging). log pi_old is recorded at rollout
time. No KL term and no value function (RIPT); several epochs over the same rollouts are allowed by the ratio.

The LOOP algorithm object decodes training rollouts at `rollout_temperature` (pi_old, recorded per token),
recomputes the log-probabilities with gradients in the decode layout (`PI0FAST.action_logp`) and validates at
`eval_temperature` (openpi: greedy). `data.repeats` passes over an iteration's chunks are the PPO epochs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from pi0_lightning.model.speed import SpeedConfig
from pi0_lightning.policy.loading import PolicyAssets


@dataclass
class LOOPLossConfig:
    name: Literal["loop"] = "loop"
    """Selects this algorithm in a config (`algorithm: {name: loop}`); the PI0-FAST default."""
    clip_low: float = 0.2
    """eps_low of the PPO clip."""
    clip_high: float | None = None
    """eps_high (asymmetric "clip-higher"); None = clip_low."""


def loop_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    token_mask: torch.Tensor,
    valid: torch.Tensor,
    config: LOOPLossConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Shapes: logp (B, T) of the sampled tokens, advantages (B,), token_mask (B, T) bool, valid (B,) bool."""
    hi = config.clip_low if config.clip_high is None else config.clip_high
    ratio = torch.exp(logp_new - logp_old.detach())
    adv = advantages[:, None].to(ratio.dtype)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - config.clip_low, 1 + hi)
    per_token = torch.maximum(unclipped, clipped)
    mask = (token_mask.bool() & valid.bool()[:, None]).to(ratio.dtype)
    n = mask.sum().clamp(min=1)
    loss = (per_token * mask).sum() / n
    with torch.no_grad():
        metrics = {
            "loss": loss.detach(),
            "clip_frac": ((clipped > unclipped).to(ratio.dtype) * mask).sum() / n,
            "ratio_mean": (ratio * mask).sum() / n,
            "approx_kl": ((logp_old - logp_new) * mask).sum() / n,
            "num_tokens": mask.sum(),
        }
    return loss, metrics


@dataclass
class LOOP(LOOPLossConfig):
    """The LOOP algorithm: stochastic decoding for rollouts, the clipped-ratio loss above, greedy validation."""

    rollout_temperature: float = 1.0
    """Decoding temperature of training rollouts (> 0; the behaviour policy pi_old)."""
    eval_temperature: float = 0.0
    """Decoding temperature in validation (0 = greedy, as openpi)."""
    max_decoding_steps: int = 256
    """Decoding budget per chunk (openpi: 256)."""

    fast: ClassVar[bool] = True
    setting_name: ClassVar[str] = "T"

    def __post_init__(self) -> None:
        if self.rollout_temperature <= 0:
            raise ValueError("LOOP needs stochastic rollouts: rollout_temperature must be > 0")

    def prepare_model(self, model) -> None:
        pass

    def build_policy(self, model, assets: PolicyAssets, device: torch.device, speed: SpeedConfig | None):
        from pi0_lightning.policy.pi0_fast_libero import LiberoFASTPolicy

        return LiberoFASTPolicy.build(
            model,
            assets.norm_stats,
            assets.tokenizer,
            assets.fast_tokenizer,
            delta_actions=assets.delta_actions,
            max_decoding_steps=self.max_decoding_steps,
            device=device,
            speed=speed,
        )

    def rollout_setting(self) -> float:
        return self.rollout_temperature

    def eval_settings(self) -> list[tuple[str, float]]:
        return [("", self.eval_temperature)]

    def configure_policy(self, policy, value: float) -> None:
        policy.temperature = value

    def loss(self, model, batch: dict[str, Any], generator: torch.Generator | None = None):
        logp = model.action_logp(
            batch["obs"],
            batch["tokens"],
            temperature=self.rollout_temperature,
            max_decoding_steps=self.max_decoding_steps,
        )
        return loop_loss(logp, batch["logp_old"], batch["advantages"], batch["token_mask"], batch["valid"], self)
