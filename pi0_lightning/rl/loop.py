"""LOOP (RIPT's RL for token policies such as PI0-FAST): RLOO advantages + the PPO clipped ratio per token.

For every action token j of a rollout with advantage A (its episode's RLOO advantage, shared by its tokens):
    r_j = exp(log pi_theta(a_j | ...) - log pi_old(a_j | ...)),
    L_j = max(-A r_j, -A clip(r_j, 1 - eps_low, 1 + eps_high)),
averaged over all valid action tokens of the batch (token-level averaging). log pi_old is recorded at rollout
time. No KL term and no value function (RIPT); several epochs over the same rollouts are allowed by the ratio.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class LOOPLossConfig:
    name: Literal["loop"] = "loop"
    """Selects this loss in a config (`loss: {name: loop}`); the PI0-FAST default."""
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
