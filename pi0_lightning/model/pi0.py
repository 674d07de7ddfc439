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

The model is the reference maths; speed paths are installed from outside (`speed.apply_speed_paths`). Besides the
Gemma layers' hook points, compilation replaces `suffix_tokens` and `euler_update`, the per-step work of
`sample_actions` around the layers, on the instance.
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


def euler_times(num_steps: int) -> list[float]:
    """The times t of openpi's Euler loop from t = 1 with dt = -1/num_steps: it runs `while t >= -dt/2` with t
    accumulated in float32, reproduced exactly."""
    dt = np.float32(-1.0 / num_steps)
    t, times = np.float32(1.0), []
    while t >= -dt / 2:
        times.append(float(t))
        t = np.float32(t + dt)
    return times


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


@dataclass
class DenoiseContext:
    """What the denoising steps against one prefix share, computed once per `sample_actions` call: the prefix cache,
    the suffix's RoPE tables and additive attention mask, PI0's state token and the condition embedding.

    With two CFG branches (`repeats` = 2) every tensor here has rows (null, positive) per batch element, and the
    steps' velocities are combined as v_null + guidance * (v_pos - v_null)."""

    prefix: PrefixCache
    rope: tuple[torch.Tensor, torch.Tensor]
    mask: torch.Tensor  # additive (B * repeats, 1, S_suf, S_prefix + S_suf)
    state_token: torch.Tensor | None
    cond_embed: torch.Tensor | None
    repeats: int = 1
    guidance: float | None = None


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
        time_emb = posemb_sincos(time, self.config.action_expert.width)
        tokens = self.suffix_tokens(x_t, time_emb, self.state_token(state), self.cond_embedding(cond))
        mask, ar_mask = self.suffix_masks(x_t.shape[0], x_t.shape[1], x_t.device)
        return tokens, mask, ar_mask, self.time_condition(time_emb)

    def state_token(self, state: torch.Tensor) -> torch.Tensor | None:
        """PI0's state token (B, 1, W_ae); None for PI0.5 (state enters as prompt text)."""
        return None if self.config.pi05 else self.state_proj(state.float())[:, None]

    def cond_embedding(self, cond: torch.Tensor | None) -> torch.Tensor | None:
        """The learned advantage-condition embedding (B, 1, W_ae) of `cond` (B,) long, or None without a condition."""
        if cond is None:
            return None
        if self.cfg_embed is None:
            raise ValueError("this model has no CFG condition embedding (see add_cfg_conditions)")
        return self.cfg_embed(cond)[:, None]

    def time_condition(self, time_emb: torch.Tensor) -> torch.Tensor | None:
        """PI0.5's adaRMS condition from the sincos time embedding (any leading dims); None for PI0."""
        if not self.config.pi05:
            return None
        return F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(time_emb))))

    def suffix_tokens(
        self,
        x_t: torch.Tensor,
        time_emb: torch.Tensor,
        state_token: torch.Tensor | None,
        cond_embed: torch.Tensor | None,
        repeats: int = 1,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Action-expert input tokens (B * repeats, S_suf, W_ae) for noisy actions x_t (B, H, action_dim), float32
        or cast to `dtype`.

        `repeats`: each row of x_t repeated for the CFG branches that share it (time_emb, state_token and cond_embed
        are already per repeated row)."""
        if repeats > 1:
            x_t = x_t.repeat_interleave(repeats, 0)
        action_tokens = self.action_in_proj(x_t.float())
        if not self.config.pi05:
            b, h = x_t.shape[:2]
            mixed = torch.cat([action_tokens, time_emb[:, None].expand(b, h, -1)], dim=-1)
            action_tokens = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(mixed)))
        if cond_embed is not None:
            action_tokens = action_tokens + cond_embed
        tokens = action_tokens if state_token is None else torch.cat([state_token, action_tokens], dim=1)
        return tokens if dtype is None else tokens.to(dtype)

    def suffix_masks(self, batch: int, horizon: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Validity mask (B, S_suf) and ar mask (S_suf,) of the suffix: [state: 1,] actions: 1, 0, ..., 0."""
        s = horizon + (0 if self.config.pi05 else 1)
        mask = torch.ones((batch, s), dtype=torch.bool, device=device)
        # built with device fills (no host copy: CUDA-graph capturable)
        ar_mask = torch.zeros(s, dtype=torch.bool, device=device)
        ar_mask[: 1 if self.config.pi05 else 2] = True
        return mask, ar_mask

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
        _, kv = self.llm([tokens, None], positions, make_attn_mask(mask, ar), return_kv=True, cache_only=True)
        return PrefixCache(kv=kv, mask=mask)

    def denoise_context(
        self,
        prefix: PrefixCache,
        state: torch.Tensor,
        cond: torch.Tensor | None = None,
        guidance: float | None = None,
        horizon: int | None = None,
    ) -> DenoiseContext:
        """Everything the denoising steps against `prefix` share, computed once (see `DenoiseContext`).

        cond (B,) long: the advantage condition of every row (None: none added). guidance: instead of `cond`, the
        CFG weight w of `sample_actions` (w = 0 or 1 runs only the null or positive branch)."""
        b, device = state.shape[0], state.device
        repeats = 1
        if guidance is not None:
            if self.cfg_embed is None:
                raise ValueError("guidance needs a model trained with CFG conditions (num_cfg_conditions > 0)")
            if guidance in (0.0, 1.0):  # a single branch: no need to run the other one
                cond = torch.full((b,), COND_POSITIVE if guidance == 1.0 else COND_NULL, device=device)
                guidance = None
            else:  # rows [i, i] = (null, positive) of element i, one prefix pass
                repeats = 2
                prefix = prefix.expand(2)
                state = state.repeat_interleave(2, 0)
                cond = torch.full((2 * b,), COND_NULL, dtype=torch.long, device=device)
                cond[1::2] = COND_POSITIVE
        s_mask, s_ar = self.suffix_masks(b * repeats, horizon or self.config.action_horizon, device)
        s = s_mask.shape[1]
        mask = torch.cat([prefix.mask[:, None, :].expand(-1, s, -1), make_attn_mask(s_mask, s_ar)], dim=2)
        positions = prefix.mask.sum(-1, keepdim=True) + torch.cumsum(s_mask.long(), dim=1) - 1
        rope, amask = self.llm.attention_inputs(positions, mask)
        return DenoiseContext(
            prefix, rope, amask, self.state_token(state), self.cond_embedding(cond), repeats, guidance
        )

    def velocity(self, ctx: DenoiseContext, x_t: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """v (B, H, action_dim) float32 at noisy actions x_t (B, H, action_dim) and times (B,), CFG branches
        combined."""
        time_emb = posemb_sincos(time.repeat_interleave(ctx.repeats, 0), self.config.action_expert.width)
        adarms = self.time_condition(time_emb)
        out = self._expert_step(ctx, x_t, time_emb, adarms)
        return self._velocity_from(out, adarms, x_t.shape[1], ctx.repeats, ctx.guidance)

    def denoise_step(
        self,
        prefix: PrefixCache,
        state: torch.Tensor,
        x_t: torch.Tensor,
        time: torch.Tensor,
        cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity (B, H, action_dim) of the suffix attending to a cached prefix."""
        return self.velocity(self.denoise_context(prefix, state, cond, horizon=x_t.shape[1]), x_t, time)

    def _expert_step(
        self, ctx: DenoiseContext, x_t: torch.Tensor, time_emb: torch.Tensor, adarms: torch.Tensor | None
    ) -> torch.Tensor:
        """The action expert's last hidden states (B * repeats, S_suf, W_ae) of one denoising step, before its final
        norm."""
        tokens = self.suffix_tokens(x_t, time_emb, ctx.state_token, ctx.cond_embed, ctx.repeats, self.compute_dtype)
        (_, out), _ = self.llm.run(
            [None, tokens], ctx.rope, ctx.mask, [None, adarms], kv_cache=ctx.prefix.kv, final_norms=False
        )
        return out

    def _velocity_from(
        self, out: torch.Tensor, adarms: torch.Tensor | None, horizon: int, repeats: int, guidance: float | None
    ) -> torch.Tensor:
        out = self.llm.norms[1](out[:, -horizon:], adarms)[0]
        v = self.action_out_proj(out.float())
        if repeats == 1:
            return v
        v_null, v_pos = v.view(-1, repeats, *v.shape[1:]).unbind(1)
        return v_null + guidance * (v_pos - v_null)

    def euler_update(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        adarms: torch.Tensor | None,
        dt: float,
        repeats: int,
        guidance: float | None,
    ) -> torch.Tensor:
        """One Euler step x + dt * v from the action expert's last hidden states `out` (before its final norm)."""
        return x + dt * self._velocity_from(out, adarms, x.shape[1], repeats, guidance)

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

        Everything the steps share is computed once, before them: the prefix's keys and values, the suffix's mask
        and RoPE tables, the state token, the condition embedding, and all steps' time embeddings (PI0.5: their
        adaRMS conditions) in one batch.
        """
        cfg = self.config
        b = obs.batch_size
        device = obs.state.device
        if noise is None:
            noise = torch.randn(
                b, cfg.action_horizon, cfg.action_dim, generator=generator, device=device, dtype=torch.float32
            )
        ctx = self.denoise_context(self.encode_prefix(obs), obs.state, guidance=guidance, horizon=noise.shape[1])
        times = euler_times(num_steps)
        rows = b * ctx.repeats
        # device fills, not a host tensor: capturable in a CUDA graph
        t_all = torch.cat([torch.full((rows,), float(t), device=device) for t in times])
        time_embs = posemb_sincos(t_all, cfg.action_expert.width).view(len(times), rows, -1)
        adarms = self.time_condition(time_embs)
        dt = float(np.float32(-1.0 / num_steps))
        x = noise.float()
        for i in range(len(times)):
            cond = None if adarms is None else adarms[i]
            out = self._expert_step(ctx, x, time_embs[i], cond)
            x = self.euler_update(x, out, cond, dt, ctx.repeats, ctx.guidance)
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
