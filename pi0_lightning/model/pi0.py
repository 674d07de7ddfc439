"""PI0 and PI0.5 (Physical Intelligence) in plain PyTorch, numerically equal to openpi's JAX `pi0.py`.

Sequence layout: a *prefix* of image tokens (SigLIP, 256 per camera, in `IMAGE_KEYS` order) and prompt tokens (Gemma
embedding times sqrt(width)), processed by the PaliGemma expert; a *suffix* processed by the action expert:
PI0 has one state token then H action tokens (x_t mixed with a sincos time embedding by an MLP); PI0.5 has H action
tokens only and feeds time through adaptive RMSNorm. Attention is blockwise causal (`make_attn_mask`): the prefix is
bidirectional and never sees the suffix; the state token starts a block; the action tokens form one bidirectional
block. Positions are cumsum(input_mask) - 1, so padding and masked cameras do not advance them.

Flow matching uses openpi's convention: t = 1 is noise, t = 0 is data, x_t = t * eps + (1 - t) * a, target
u = eps - a, t ~ Beta(1.5, 1) * 0.999 + 0.001. Sampling integrates 10 Euler steps from t = 1 with dt = -0.1
(t accumulated in float32 as openpi does), reusing the prefix keys/values computed once per call.

`forward` returns the unreduced per-element loss (B, H, action_dim); reduction and weighting belong to the RL loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pi0_lightning.model.config import IMAGE_KEYS, PI0Config
from pi0_lightning.model.gemma import JointGemma, KVCache, RMSNorm
from pi0_lightning.model.observation import Observation
from pi0_lightning.model.siglip import LayerNorm32, SiglipVision

# Parameters that stay float32 in the bfloat16 policy (openpi's `to_bfloat16_for_selected_params`): the projections
# that talk to the outside world; norms and the patch/position embeddings are handled by type and name below.
FLOAT32_MODULES = (
    "state_proj",
    "action_in_proj",
    "action_out_proj",
    "action_time_mlp_in",
    "action_time_mlp_out",
    "time_mlp_in",
    "time_mlp_out",
    "vision.patch_embed",
)


def make_attn_mask(input_mask: torch.Tensor, ar_mask: torch.Tensor) -> torch.Tensor:
    """big_vision's block-causal mask: token i sees valid token j iff cumsum(ar)[j] <= cumsum(ar)[i].

    input_mask (B, N) bool; ar_mask (N,) or (B, N) bool/int. Returns (B, N, N) bool.
    """
    ar = torch.broadcast_to(ar_mask.to(torch.int64), input_mask.shape)
    cum = torch.cumsum(ar, dim=1)
    attn = cum[:, None, :] <= cum[:, :, None]
    valid = input_mask[:, None, :] & input_mask[:, :, None]
    return attn & valid


def posemb_sincos(t: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> torch.Tensor:
    """Sine-cosine embedding of scalar times (B,) -> (B, dim), sin first; computed in float64, returned float32."""
    if dim % 2:
        raise ValueError(f"time embedding dim must be even, got {dim}")
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    arg = t.to(torch.float64)[:, None] * (2 * math.pi / period)[None, :]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1).to(torch.float32)


def sample_time(
    batch_size: int, alpha: float = 1.5, beta: float = 1.0, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """t ~ Beta(alpha, beta) * 0.999 + 0.001 (float32).

    For beta == 1 (openpi's default) Beta(alpha, 1) is sampled exactly by inverse CDF u**(1/alpha), which takes a
    generator (reproducible per rank) and cannot produce the NaNs that ratio-of-powers samplers hit in bf16.
    """
    if beta == 1.0:
        u = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)
        b = u ** (1.0 / alpha)
    else:
        dist = torch.distributions.Beta(
            torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64)
        )
        b = dist.sample((batch_size,)).to(device)
    return (b * 0.999 + 0.001).to(torch.float32)


@dataclass
class PrefixCache:
    """Keys/values of the prefix (per layer, after RoPE) and its validity mask, computed once per observation."""

    kv: KVCache
    mask: torch.Tensor  # (B, S_prefix) bool

    def expand(self, repeats: int) -> PrefixCache:
        """Repeat every batch element `repeats` times (e.g. one prefix shared by several CFG branches)."""
        return PrefixCache(
            kv=[(k.repeat_interleave(repeats, 0), v.repeat_interleave(repeats, 0)) for k, v in self.kv],
            mask=self.mask.repeat_interleave(repeats, 0),
        )


class PI0(nn.Module):
    def __init__(self, config: PI0Config):
        super().__init__()
        self.config = config
        pg, ae = config.paligemma, config.action_expert
        self.vision = SiglipVision(config.vision, pg.width, config.layer_norm_eps)
        self.llm = JointGemma([pg, ae], config.vocab_size, config.rms_norm_eps, adarms=[False, config.pi05])
        w = ae.width
        self.action_in_proj = nn.Linear(config.action_dim, w)
        self.action_out_proj = nn.Linear(w, config.action_dim)
        if config.pi05:
            self.time_mlp_in = nn.Linear(w, w)
            self.time_mlp_out = nn.Linear(w, w)
        else:
            self.state_proj = nn.Linear(config.action_dim, w)
            self.action_time_mlp_in = nn.Linear(2 * w, w)
            self.action_time_mlp_out = nn.Linear(w, w)
        self.apply_dtype_policy(config.dtype)

    # ------------------------------------------------------------------ dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.config.dtype == "bfloat16" else torch.float32

    def apply_dtype_policy(self, dtype: str) -> PI0:
        """Cast to `dtype` ("float32" or "bfloat16"), keeping openpi's float32 islands in bfloat16."""
        self.config.dtype = dtype  # type: ignore[assignment]
        target = self.compute_dtype
        keep32 = {
            id(p)
            for name, m in self.named_modules()
            if isinstance(m, RMSNorm | LayerNorm32) or name in FLOAT32_MODULES
            for p in m.parameters()
        }
        keep32.add(id(self.vision.pos_embed))
        for p in self.parameters():
            p.data = p.data.to(torch.float32 if id(p) in keep32 else target)
        return self

    # ------------------------------------------------------------------ embeddings

    def embed_prefix(self, obs: Observation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image and prompt tokens (B, S_pre, W_pg), their validity mask (B, S_pre), ar mask (S_pre,)."""
        unknown = set(obs.images) - set(IMAGE_KEYS)
        if unknown:
            raise KeyError(f"unknown camera(s) {sorted(unknown)}; expected a subset of {IMAGE_KEYS}")
        keys = [k for k in IMAGE_KEYS if k in obs.images]
        b = obs.batch_size
        # one SigLIP call for all cameras: (C*B, 3, H, W) -> (C, B, N, W) -> (B, C*N, W)
        img = self.vision(torch.cat([obs.images[k] for k in keys]))
        n = img.shape[1]
        img = img.view(len(keys), b, n, -1).transpose(0, 1).reshape(b, len(keys) * n, -1)
        lang = self.llm.embed(obs.tokenized_prompt)
        tokens = torch.cat([img.to(self.compute_dtype), lang.to(self.compute_dtype)], dim=1)
        img_mask = torch.stack([obs.image_masks[k].bool() for k in keys], dim=1).repeat_interleave(n, dim=1)
        input_mask = torch.cat([img_mask, obs.tokenized_prompt_mask.bool()], dim=1)
        ar_mask = torch.zeros(tokens.shape[1], dtype=torch.bool, device=tokens.device)
        return tokens, input_mask, ar_mask

    def embed_suffix(
        self, state: torch.Tensor, x_t: torch.Tensor, time: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Action-expert tokens (B, S_suf, W_ae), mask, ar mask, and the adaRMS condition (PI0.5) or None."""
        cfg = self.config
        b, h = x_t.shape[:2]
        time_emb = posemb_sincos(time, cfg.action_expert.width)
        action_tokens = self.action_in_proj(x_t.float())
        tokens: list[torch.Tensor] = []
        ar: list[bool] = []
        if cfg.pi05:
            cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(time_emb))))
            tokens.append(action_tokens)
        else:
            cond = None
            tokens.append(self.state_proj(state.float())[:, None])
            ar.append(True)
            mixed = torch.cat([action_tokens, time_emb[:, None].expand(b, h, -1)], dim=-1)
            tokens.append(self.action_time_mlp_out(F.silu(self.action_time_mlp_in(mixed))))
        ar += [True] + [False] * (h - 1)
        out = torch.cat(tokens, dim=1)
        mask = torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)
        return out, mask, torch.tensor(ar, device=out.device), cond

    # ------------------------------------------------------------------ training

    def predict_velocity(self, obs: Observation, x_t: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """v_t (B, H, action_dim) float32 from one joint forward over [prefix, suffix], as openpi's compute_loss."""
        prefix, p_mask, p_ar = self.embed_prefix(obs)
        suffix, s_mask, s_ar, cond = self.embed_suffix(obs.state, x_t, time)
        input_mask = torch.cat([p_mask, s_mask], dim=1)
        attn = make_attn_mask(input_mask, torch.cat([p_ar, s_ar]))
        positions = torch.cumsum(input_mask.long(), dim=1) - 1
        (_, out), _ = self.llm([prefix, suffix], positions, attn, conds=[None, cond])
        return self.action_out_proj(out[:, -x_t.shape[1] :].float())

    def forward(
        self,
        obs: Observation,
        actions: torch.Tensor,
        noise: torch.Tensor | None = None,
        time: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-element flow-matching loss (B, H, action_dim), unreduced (padding dims included, as openpi)."""
        actions = actions.float()
        if noise is None:
            noise = torch.randn_like(actions)
        if time is None:
            cfg = self.config
            time = sample_time(actions.shape[0], cfg.time_beta_alpha, cfg.time_beta_beta, device=actions.device)
        t = time[:, None, None]
        x_t = t * noise + (1 - t) * actions
        v_t = self.predict_velocity(obs, x_t, time)
        return (v_t - (noise - actions)) ** 2

    # ------------------------------------------------------------------ sampling

    def encode_prefix(self, obs: Observation) -> PrefixCache:
        """Run the PaliGemma expert over the prefix once and keep its keys/values."""
        tokens, mask, ar = self.embed_prefix(obs)
        positions = torch.cumsum(mask.long(), dim=1) - 1
        _, kv = self.llm([tokens, None], positions, make_attn_mask(mask, ar), return_kv=True)
        return PrefixCache(kv=kv, mask=mask)

    def denoise_step(
        self, prefix: PrefixCache, state: torch.Tensor, x_t: torch.Tensor, time: torch.Tensor
    ) -> torch.Tensor:
        """Velocity (B, H, action_dim) of the suffix attending to a cached prefix."""
        suffix, s_mask, s_ar, cond = self.embed_suffix(state, x_t, time)
        s = suffix.shape[1]
        mask = torch.cat([prefix.mask[:, None, :].expand(-1, s, -1), make_attn_mask(s_mask, s_ar)], dim=2)
        positions = prefix.mask.sum(-1, keepdim=True) + torch.cumsum(s_mask.long(), dim=1) - 1
        (_, out), _ = self.llm([None, suffix], positions, mask, conds=[None, cond], kv_cache=prefix.kv)
        return self.action_out_proj(out[:, -x_t.shape[1] :].float())

    @torch.no_grad()
    def sample_actions(
        self,
        obs: Observation,
        noise: torch.Tensor | None = None,
        num_steps: int = 10,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Euler-integrate the flow from noise (t=1) to actions (t~0): (B, H, action_dim) float32."""
        cfg = self.config
        b = obs.batch_size
        device = obs.state.device
        if noise is None:
            noise = torch.randn(
                b, cfg.action_horizon, cfg.action_dim, generator=generator, device=device, dtype=torch.float32
            )
        prefix = self.encode_prefix(obs)
        x = noise.float()
        # openpi loops `while t >= -dt/2` with t accumulated in float32; reproduce it exactly
        dt = np.float32(-1.0 / num_steps)
        t = np.float32(1.0)
        while t >= -dt / 2:
            v = self.denoise_step(prefix, obs.state, x, torch.full((b,), float(t), device=device))
            x = x + float(dt) * v
            t = np.float32(t + dt)
        return x

    # ------------------------------------------------------------------ checkpoints

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | None = None, device: str | torch.device = "cpu") -> PI0:
        """Load a pi0_lightning checkpoint directory (`model.safetensors` + `config.json`)."""
        from pi0_lightning.checkpoint import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, **extra) -> None:
        """Write `model.safetensors` and `config.json` (plus `norm_stats`/`tokenizer_path` if given)."""
        from pi0_lightning.checkpoint import save_pretrained

        save_pretrained(self, path, **extra)
