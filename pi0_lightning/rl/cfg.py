"""RIPT-CFG for PI0 / PI0.5: CFG-style advantage-conditioned flow matching (CFGRL) on RIPT-style rollouts.

Every executed chunk c of a rollout is a training sample: its own start observation o_c, the normalised actions the
policy executed from it (padded to the horizon H, padded rows masked), and the RLOO advantage A of its episode.
The action expert gets a learned condition embedding e in {null, positive (, negative)}, zero-initialised, so the
converted model is unchanged at step 0. With the flow-matching error per chunk (openpi's convention, t = 1 noise)

    FM(e) = mean over executed rows h and action dims d of (v_theta(x_t, t, o_c, e) - (eps - a))^2,
    x_t = t * eps + (1 - t) * a,   t ~ 0.999 * Beta(1.5, 1) + 0.001,   eps ~ N(0, I),

the default ("two_branch") loss is

    L = weight(A) * 1[A > 0] * FM(positive) + alpha * FM(null),

with the same eps and t in both branches, weight(A) = 1 ("indicator") or clip(A, 0, a_max) ("advantage"), alpha 0.1;
padded samples (valid = False, used to keep ranks in lockstep) are masked out. Both branches' suffixes attend to one
shared prefix pass (identical to two full forwards, cheaper). The "three_label" option trains a single branch whose
label is positive for A > 0 and negative otherwise, replaced by null with probability `label_dropout` (CFGRL's flowiql).

Sampling uses v = v_null + w * (v_pos - v_null) at every Euler step with the *same* null condition used here.

Deliberate simplifications: no likelihoods, no importance ratio, no KL term (this is not a policy gradient: the
positive branch is supervised on the successes of non-degenerate groups, the null branch on everything); the
episode-level advantage is broadcast to all of its chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from pi0_lightning.model.observation import Observation
from pi0_lightning.model.pi0 import COND_NEGATIVE, COND_NULL, COND_POSITIVE, PI0, sample_time
from pi0_lightning.model.speed import SpeedConfig
from pi0_lightning.policy.loading import PolicyAssets


@dataclass
class CFGLossConfig:
    name: Literal["cfg"] = "cfg"
    """Selects this algorithm in a config (`algorithm: {name: cfg}`); the PI0 / PI0.5 default."""
    variant: Literal["two_branch", "three_label"] = "two_branch"
    """two_branch: weight(A)*1[A>0]*FM(pos) + alpha*FM(null); three_label: one branch, labels pos/neg with dropout."""
    alpha: float = 0.1
    """Weight of the null (unconditional) branch in two_branch."""
    weighting: Literal["indicator", "advantage"] = "indicator"
    """weight(A) of the positive branch: 1, or the advantage clipped to [0, max_advantage]."""
    max_advantage: float = 1.0
    """a_max for weighting='advantage'."""
    label_dropout: float = 0.1
    """three_label: probability that a sample's label is replaced by null."""

    @property
    def num_conditions(self) -> int:
        return 3 if self.variant == "three_label" else 2


def masked_fm(v: torch.Tensor, u: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """Flow-matching error per sample (B,): mean of (v - u)^2 over executed rows and all action dims."""
    err = (v - u).pow(2) * action_mask[:, :, None]
    denom = (action_mask.sum(1) * v.shape[-1]).clamp(min=1)
    return err.sum((1, 2)) / denom


def cfg_loss(
    model: PI0,
    obs: Observation,
    actions: torch.Tensor,
    action_mask: torch.Tensor,
    advantages: torch.Tensor,
    valid: torch.Tensor,
    config: CFGLossConfig,
    noise: torch.Tensor | None = None,
    time: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The batch loss (mean over valid samples) and detached metrics. Shapes: actions (B, H, D), mask (B, H)."""
    b = actions.shape[0]
    device = actions.device
    actions = actions.float()
    mask = action_mask.float()
    valid = valid.float()
    if noise is None:
        noise = torch.randn(actions.shape, generator=generator, device=device)
    if time is None:
        cfg = model.config
        time = sample_time(b, cfg.time_beta_alpha, cfg.time_beta_beta, generator=generator, device=device)
    t = time[:, None, None]
    x_t = t * noise + (1 - t) * actions
    u_t = noise - actions
    positive = (advantages > 0).float()
    n_valid = valid.sum().clamp(min=1)
    prefix = model.encode_prefix(obs)

    if config.variant == "two_branch":
        both = prefix.expand(2)  # rows (2i, 2i+1) = (null, positive) of sample i, one prefix pass
        conds = torch.full((2 * b,), COND_NULL, dtype=torch.long, device=device)
        conds[1::2] = COND_POSITIVE
        v = model.denoise_step(
            both, obs.state.repeat_interleave(2, 0), x_t.repeat_interleave(2, 0), time.repeat_interleave(2, 0), conds
        )
        v_null, v_pos = v.view(b, 2, *v.shape[1:]).unbind(1)
        fm_null = masked_fm(v_null, u_t, mask)
        fm_pos = masked_fm(v_pos, u_t, mask)
        if config.weighting == "advantage":
            weight = advantages.float().clamp(0, config.max_advantage)
        else:
            weight = torch.ones_like(positive)
        per_sample = weight * positive * fm_pos + config.alpha * fm_null
        metrics = {
            "fm_null": (valid * fm_null).sum() / n_valid,
            "fm_pos": (valid * positive * fm_pos).sum() / (valid * positive).sum().clamp(min=1),
        }
    elif config.variant == "three_label":
        labels = torch.where(advantages > 0, COND_POSITIVE, COND_NEGATIVE).to(device)
        drop = torch.rand(b, generator=generator, device=device) < config.label_dropout
        labels = torch.where(drop, torch.full_like(labels, COND_NULL), labels)
        v = model.denoise_step(prefix, obs.state, x_t, time, labels)
        per_sample = masked_fm(v, u_t, mask)
        metrics = {"fm": (valid * per_sample).sum() / n_valid, "frac_null": drop.float().mean()}
    else:
        raise ValueError(f"unknown CFG loss variant {config.variant!r}")
    loss = (valid * per_sample).sum() / n_valid
    metrics.update(
        {
            "loss": loss.detach(),
            "frac_positive": (valid * positive).sum() / n_valid,
            "num_valid": valid.sum(),
        }
    )
    return loss, {k: v.detach() for k, v in metrics.items()}


@dataclass
class CFG(CFGLossConfig):
    """The CFG algorithm: the loss above, rollouts with the guided sampler, validation swept over w."""

    rollout_guidance: float = 1.0
    """CFG weight w of training rollouts (1 = the positive-conditioned policy)."""
    eval_guidance: list[float] = field(default_factory=lambda: [1.0])
    """CFG weights evaluated in validation; the first is logged as val/success_rate."""
    num_denoise_steps: int = 10
    """Euler steps of the flow sampler."""
    norm_mode: Literal["zscore", "quantile"] | None = None
    """Normalisation of state and actions: zscore (pi0) or quantile (pi05); default by model type."""

    fast: ClassVar[bool] = False
    setting_name: ClassVar[str] = "w"

    def prepare_model(self, model: PI0) -> None:
        model.add_cfg_conditions(self.num_conditions)

    def build_policy(self, model: PI0, assets: PolicyAssets, device: torch.device, speed: SpeedConfig | None):
        from pi0_lightning.policy.pi0_libero import LiberoPolicy

        return LiberoPolicy.build(
            model,
            assets.norm_stats,
            assets.tokenizer,
            delta_actions=assets.delta_actions,
            norm_mode=self.norm_mode,
            num_steps=self.num_denoise_steps,
            device=device,
            speed=speed,
        )

    def rollout_setting(self) -> float:
        return self.rollout_guidance

    def eval_settings(self) -> list[tuple[str, float]]:
        return [("" if i == 0 else f"_w{w:g}", w) for i, w in enumerate(self.eval_guidance or [1.0])]

    def configure_policy(self, policy, value: float) -> None:
        policy.guidance = value

    def loss(self, model: PI0, batch: dict[str, Any], generator: torch.Generator | None = None):
        return cfg_loss(
            model,
            batch["obs"],
            batch["actions"],
            batch["action_mask"],
            batch["advantages"],
            batch["valid"],
            self,
            generator=generator,
        )
