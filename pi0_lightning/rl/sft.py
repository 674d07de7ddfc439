"""Supervised fine-tuning on demonstrations: openpi's training losses, as an algorithm object beside CFG and LOOP.

- PI0 / PI0.5: flow matching on the demonstrated chunk a (openpi's convention, t = 1 is noise),
      L = mean over batch, horizon and action dims (padding dims too, as openpi) of (v(x_t, t, o) - (eps - a))^2,
      x_t = t * eps + (1 - t) * a,   t ~ 0.999 * Beta(1.5, 1) + 0.001,   eps ~ N(0, I);
  with `mask_padded_actions` (data side) chunk rows past the episode's end are left out of the mean.
- PI0-FAST: cross-entropy of the action postfix tokens ("Action: " + FAST tokens + "|" + EOS) given the prefix,
  averaged per example over the postfix and then over the batch (openpi's compute_loss).

No condition embedding is added: the fine-tuned model is a plain openpi policy, and RL (`rl/cfg.py`) adds its
zero-initialised embedding afterwards. Validation rollouts sample as openpi evaluates (PI0: no guidance; PI0-FAST:
greedy decoding). Deliberate simplification: no EMA of the weights (openpi keeps one at 0.99 for PI0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from pi0_lightning.model.pi0 import sample_time
from pi0_lightning.model.speed import SpeedConfig
from pi0_lightning.policy.loading import PolicyAssets


def flow_matching_loss(
    model, obs, actions: torch.Tensor, action_mask: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """openpi's PI0 loss, the mean over the rows `action_mask` keeps (all rows: exactly openpi's full mean)."""
    actions = actions.float()
    noise = torch.randn(actions.shape, generator=generator, device=actions.device)
    cfg = model.config
    b, device = actions.shape[0], actions.device
    time = sample_time(b, cfg.time_beta_alpha, cfg.time_beta_beta, generator=generator, device=device)
    err = model(obs, actions, noise=noise, time=time)  # (B, H, D)
    mask = action_mask.float()[:, :, None].expand_as(err)
    return (err * mask).sum() / mask.sum().clamp(min=1)


@dataclass
class SFT:
    """Supervised fine-tuning (PI0, PI0.5 and PI0-FAST)."""

    name: Literal["sft"] = "sft"
    """Selects this algorithm in a config (`algorithm: {name: sft}`)."""
    num_denoise_steps: int = 10
    """Euler steps of validation rollouts (PI0 / PI0.5)."""
    norm_mode: Literal["zscore", "quantile"] | None = None
    """Normalisation of state and actions: zscore (pi0) or quantile (pi05, PI0-FAST); default by model type."""
    max_decoding_steps: int = 256
    """Decoding budget per chunk of validation rollouts (PI0-FAST; openpi: 256)."""

    fast: ClassVar[bool | None] = None
    """Trains either kind of model."""
    setting_name: ClassVar[str] = "sft"

    def prepare_model(self, model: torch.nn.Module) -> None:
        pass

    def build_policy(self, model, assets: PolicyAssets, device: torch.device, speed: SpeedConfig | None):
        """The policy RL would build for this model (openpi's LIBERO transforms), sampling as openpi evaluates."""
        from pi0_lightning.model.pi0_fast import PI0FAST
        from pi0_lightning.rl.cfg import CFG
        from pi0_lightning.rl.loop import LOOP

        if isinstance(model, PI0FAST):
            return LOOP(max_decoding_steps=self.max_decoding_steps).build_policy(model, assets, device, speed)
        builder = CFG(num_denoise_steps=self.num_denoise_steps, norm_mode=self.norm_mode)
        return builder.build_policy(model, assets, device, speed)

    def rollout_setting(self) -> float:
        return 0.0

    def eval_settings(self) -> list[tuple[str, float]]:
        return [("", 0.0)]

    def configure_policy(self, policy, value: float) -> None:
        if hasattr(policy, "temperature"):
            policy.temperature = value  # greedy decoding
        else:
            policy.guidance = None  # plain sampling

    def loss(
        self, model, batch: dict[str, Any], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from pi0_lightning.model.pi0_fast import PI0FAST

        if isinstance(model, PI0FAST):
            loss = model(batch["obs"]).mean()
        else:
            loss = flow_matching_loss(model, batch["obs"], batch["actions"], batch["action_mask"], generator)
        return loss, {"loss": loss.detach()}
