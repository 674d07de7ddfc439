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
    "cfg_embed",
    "vision.patch_embed",
)
# Advantage conditions of the CFG-style RL loss (see rl/losses.py); index 0 is the "null" (unconditional) branch.
COND_NULL, COND_POSITIVE, COND_NEGATIVE = 0, 1, 2


def cast_with_float32_islands(model: nn.Module, target: torch.dtype) -> None:
    """Cast parameters to `target` except openpi's float32 islands: norms, the patch/position embeddings and the
    projections named in FLOAT32_MODULES."""
    keep32 = {
        id(p)
        for name, m in model.named_modules()
        if isinstance(m, RMSNorm | LayerNorm32) or name in FLOAT32_MODULES
        for p in m.parameters()
    }
    keep32.update(id(m.pos_embed) for m in model.modules() if isinstance(m, SiglipVision))
    for p in model.parameters():
        p.data = p.data.to(torch.float32 if id(p) in keep32 else target)


def embed_images(vision: SiglipVision, obs: Observation) -> tuple[torch.Tensor, torch.Tensor]:
    """Image tokens (B, C*N, W) of the cameras present, in IMAGE_KEYS order, and their validity mask (B, C*N)."""
    unknown = set(obs.images) - set(IMAGE_KEYS)
    if unknown:
        raise KeyError(f"unknown camera(s) {sorted(unknown)}; expected a subset of {IMAGE_KEYS}")
    keys = [k for k in IMAGE_KEYS if k in obs.images]
    b = obs.batch_size
    # one SigLIP call for all cameras: (C*B, 3, H, W) -> (C, B, N, W) -> (B, C*N, W)
    img = vision(torch.cat([obs.images[k] for k in keys]))
    n = img.shape[1]
    img = img.view(len(keys), b, n, -1).transpose(0, 1).reshape(b, len(keys) * n, -1)
    mask = torch.stack([obs.image_masks[k].bool() for k in keys], dim=1).repeat_interleave(n, dim=1)
    return img, mask


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
        self.cfg_embed = self._make_cfg_embed(config.num_cfg_conditions)
        self.apply_dtype_policy(config.dtype)

    def _make_cfg_embed(self, n: int) -> nn.Embedding | None:
        if n == 0:
            return None
        if n not in (2, 3):
            raise ValueError(f"num_cfg_conditions must be 0, 2 (null, positive) or 3 (+ negative), got {n}")
        emb = nn.Embedding(n, self.config.action_expert.width)
        # zero-initialised: a converted checkpoint computes exactly what it did before RL, in every branch
        nn.init.zeros_(emb.weight)
        return emb

    def add_cfg_conditions(self, n: int = 2) -> PI0:
        """Add the learned advantage-condition embedding (zero-initialised) to a model that has none."""
        if self.cfg_embed is not None:
            if self.cfg_embed.num_embeddings != n:
                raise ValueError(f"model already has {self.cfg_embed.num_embeddings} CFG conditions, asked for {n}")
            return self
        device = self.action_in_proj.weight.device
        self.config.num_cfg_conditions = n
        self.cfg_embed = self._make_cfg_embed(n).to(device)
        return self

    # ------------------------------------------------------------------ dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.config.dtype == "bfloat16" else torch.float32

    def apply_dtype_policy(self, dtype: str) -> PI0:
        """Cast to `dtype` ("float32" or "bfloat16"), keeping openpi's float32 islands in bfloat16."""
        self.config.dtype = dtype  # type: ignore[assignment]
        cast_with_float32_islands(self, self.compute_dtype)
        return self

    # ------------------------------------------------------------------ embeddings

    def embed_prefix(self, obs: Observation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image and prompt tokens (B, S_pre, W_pg), their validity mask (B, S_pre), ar mask (S_pre,)."""
        img, img_mask = embed_images(self.vision, obs)
        lang = self.llm.embed(obs.tokenized_prompt)
        tokens = torch.cat([img.to(self.compute_dtype), lang.to(self.compute_dtype)], dim=1)
        input_mask = torch.cat([img_mask, obs.tokenized_prompt_mask.bool()], dim=1)
        ar_mask = torch.zeros(tokens.shape[1], dtype=torch.bool, device=tokens.device)
        return tokens, input_mask, ar_mask

    def embed_suffix(
        self, state: torch.Tensor, x_t: torch.Tensor, time: torch.Tensor, cond: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Action-expert tokens (B, S_suf, W_ae), mask, ar mask, and the adaRMS condition (PI0.5) or None.

        `cond` (B,) long selects the learned advantage condition added to every action token (None: none added).
        """
        cfg = self.config
        b, h = x_t.shape[:2]
        time_emb = posemb_sincos(time, cfg.action_expert.width)
        action_tokens = self.action_in_proj(x_t.float())
        tokens: list[torch.Tensor] = []
        if cfg.pi05:
            adarms = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(time_emb))))
        else:
            adarms = None
            tokens.append(self.state_proj(state.float())[:, None])
            mixed = torch.cat([action_tokens, time_emb[:, None].expand(b, h, -1)], dim=-1)
            action_tokens = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(mixed)))
        if cond is not None:
            if self.cfg_embed is None:
                raise ValueError("this model has no CFG condition embedding (see add_cfg_conditions)")
            action_tokens = action_tokens + self.cfg_embed(cond)[:, None]
        tokens.append(action_tokens)
        out = torch.cat(tokens, dim=1)
        mask = torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)
        # [state: 1,] actions: 1, 0, ..., 0 -- built with device fills (no host copy: CUDA-graph capturable)
        ar_mask = torch.zeros(out.shape[1], dtype=torch.bool, device=out.device)
        ar_mask[: 1 if cfg.pi05 else 2] = True
        return out, mask, ar_mask, adarms

    # ------------------------------------------------------------------ training

    def predict_velocity(
        self, obs: Observation, x_t: torch.Tensor, time: torch.Tensor, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """v_t (B, H, action_dim) float32 from one joint forward over [prefix, suffix], as openpi's compute_loss."""
        prefix, p_mask, p_ar = self.embed_prefix(obs)
        suffix, s_mask, s_ar, adarms = self.embed_suffix(obs.state, x_t, time, cond)
        input_mask = torch.cat([p_mask, s_mask], dim=1)
        attn = make_attn_mask(input_mask, torch.cat([p_ar, s_ar]))
        positions = torch.cumsum(input_mask.long(), dim=1) - 1
        (_, out), _ = self.llm([prefix, suffix], positions, attn, conds=[None, adarms])
        return self.action_out_proj(out[:, -x_t.shape[1] :].float())

    def forward(
        self,
        obs: Observation,
        actions: torch.Tensor,
        noise: torch.Tensor | None = None,
        time: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
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
        v_t = self.predict_velocity(obs, x_t, time, cond)
        return (v_t - (noise - actions)) ** 2

    # ------------------------------------------------------------------ sampling

    def encode_prefix(self, obs: Observation) -> PrefixCache:
        """Run the PaliGemma expert over the prefix once and keep its keys/values."""
        tokens, mask, ar = self.embed_prefix(obs)
        positions = torch.cumsum(mask.long(), dim=1) - 1
        _, kv = self.llm([tokens, None], positions, make_attn_mask(mask, ar), return_kv=True)
        return PrefixCache(kv=kv, mask=mask)

    def denoise_step(
        self,
        prefix: PrefixCache,
        state: torch.Tensor,
        x_t: torch.Tensor,
        time: torch.Tensor,
        cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity (B, H, action_dim) of the suffix attending to a cached prefix."""
        suffix, s_mask, s_ar, adarms = self.embed_suffix(state, x_t, time, cond)
        s = suffix.shape[1]
        mask = torch.cat([prefix.mask[:, None, :].expand(-1, s, -1), make_attn_mask(s_mask, s_ar)], dim=2)
        positions = prefix.mask.sum(-1, keepdim=True) + torch.cumsum(s_mask.long(), dim=1) - 1
        (_, out), _ = self.llm([None, suffix], positions, mask, conds=[None, adarms], kv_cache=prefix.kv)
        return self.action_out_proj(out[:, -x_t.shape[1] :].float())

    @torch.no_grad()
    def sample_actions(
        self,
        obs: Observation,
        noise: torch.Tensor | None = None,
        num_steps: int = 10,
        generator: torch.Generator | None = None,
        guidance: float | None = None,
    ) -> torch.Tensor:
        """Euler-integrate the flow from noise (t=1) to actions (t~0): (B, H, action_dim) float32.

        guidance: None samples the plain model (no condition added). With the CFG embedding, w gives
        v = v_null + w * (v_pos - v_null) at every Euler step (w = 1: the positive-conditioned policy, one pass;
        w = 0: the null branch); both branches share one prefix pass.
        """
        cfg = self.config
        b = obs.batch_size
        device = obs.state.device
        if noise is None:
            noise = torch.randn(
                b, cfg.action_horizon, cfg.action_dim, generator=generator, device=device, dtype=torch.float32
            )
        prefix = self.encode_prefix(obs)
        velocity = self._guided_velocity(prefix, obs.state, guidance)
        x = noise.float()
        # openpi loops `while t >= -dt/2` with t accumulated in float32; reproduce it exactly
        dt = np.float32(-1.0 / num_steps)
        t = np.float32(1.0)
        while t >= -dt / 2:
            v = velocity(x, torch.full((b,), float(t), device=device))
            x = x + float(dt) * v
            t = np.float32(t + dt)
        return x

    def _guided_velocity(self, prefix: PrefixCache, state: torch.Tensor, guidance: float | None):
        """A function (x_t, t) -> v for the requested guidance; shares the prefix between CFG branches."""
        if guidance is None:
            return lambda x, t: self.denoise_step(prefix, state, x, t)
        if self.cfg_embed is None:
            raise ValueError("guidance needs a model trained with CFG conditions (num_cfg_conditions > 0)")
        b = state.shape[0]
        device = state.device
        if guidance in (0.0, 1.0):  # a single branch: no need to run the other one
            cond = torch.full((b,), COND_POSITIVE if guidance == 1.0 else COND_NULL, device=device)
            return lambda x, t: self.denoise_step(prefix, state, x, t, cond)
        both = prefix.expand(2)  # rows [i, i] = (null, positive) of element i
        conds = torch.full((2 * b,), COND_NULL, dtype=torch.long, device=device)
        conds[1::2] = COND_POSITIVE
        state2 = state.repeat_interleave(2, 0)

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            v = self.denoise_step(both, state2, x.repeat_interleave(2, 0), t.repeat_interleave(2, 0), conds)
            v_null, v_pos = v.view(b, 2, *v.shape[1:]).unbind(1)
            return v_null + guidance * (v_pos - v_null)

        return velocity

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
