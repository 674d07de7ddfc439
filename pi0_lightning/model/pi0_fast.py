"""PI0-FAST (openpi `pi0_fast.py`): SigLIP + one PaliGemma Gemma, actions as discrete FAST tokens.

The sequence is the images' tokens then the tokenised text (prefix `Task: ..., State: ...;\\n` with ar = 0, postfix
`Action: <FAST tokens>|<eos>` with ar = 1, so the postfix is causal and the prefix bidirectional). Training is
next-token cross-entropy on the postfix only: the model sees the embeddings without the last token, positions are
0..T-2 (arange, padding included, as openpi's training path), and logits are pre-logits times the tied embedding.

Decoding follows openpi exactly, quirks included: each row is rolled so that its trailing padding comes first
("left to right align"), the prefix is prefilled with positions cumsum(mask) - 1, the first token comes from the last
prefix logit, and decoded token i sits at position prefill_len + i + 1 (a one-position gap after the prefix) and
attends to every cache slot from the row's first valid token on (masked image tokens in the middle included).
Decoding stops when every row has produced EOS, or after `max_decoding_steps`.

For RL (LOOP, `rl/loop.py`) the log-probs of the decoded tokens are recorded while sampling, and `action_logp`
recomputes them with gradients in one teacher-forced pass that reproduces the decode layout (including the position
gap), so the PPO ratio is exactly 1 at unchanged weights. Deliberate choice: RL scores tokens in the layout they were
sampled in, not in openpi's supervised training layout (which differs by that one-position gap).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pi0_lightning.model.config import (
    PALIGEMMA_VOCAB_SIZE,
    GemmaConfig,
    SiglipConfig,
    coerce_sub_configs,
    tiny_gemma,
    tiny_vision,
)
from pi0_lightning.model.gemma import JointGemma
from pi0_lightning.model.observation import Observation
from pi0_lightning.model.pi0 import embed_images, make_attn_mask
from pi0_lightning.model.siglip import SiglipVision

EOS_ID = 1


@dataclass
class PI0FASTConfig:
    vision: SiglipConfig = field(default_factory=SiglipConfig)
    """SigLIP tower; its head projects to the Gemma width."""
    paligemma: GemmaConfig = field(default_factory=GemmaConfig)
    """The single Gemma (openpi's gemma_fast: gemma_2b sizes)."""
    vocab_size: int = PALIGEMMA_VOCAB_SIZE
    """Embedding rows; FAST ids are 257023 - k, so the full PaliGemma vocabulary is kept."""
    max_token_len: int = 180
    """Prompt + action tokens (openpi's pi0_fast_libero: 180)."""
    action_dim: int = 7
    action_horizon: int = 10
    dtype: Literal["float32", "bfloat16"] = "float32"
    rms_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        coerce_sub_configs(self, vision=SiglipConfig, paligemma=GemmaConfig)

    @property
    def fast_offset(self) -> int:
        """PaliGemma id of FAST token 0: vocab_size - 1 - 128 (257023 for the real vocabulary; openpi skips the
        last 128 ids). Smaller vocabularies (random test models) keep the same rule."""
        return self.vocab_size - 1 - 128

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def variant(cls, name: str, **overrides: Any) -> PI0FASTConfig:
        """`pi0_fast` (openpi's Pi0FASTConfig for LIBERO: So400m + gemma_2b), `pi0_fast_tiny` (the parity fixture's
        sizes, full vocabulary), `pi0_fast_micro` (112 px, small vocabulary: the CPU learning proof)."""
        if name not in FAST_VARIANTS:
            raise ValueError(f"unknown PI0-FAST variant {name!r}; choose from {', '.join(sorted(FAST_VARIANTS))}")
        return cls(**{**FAST_VARIANTS[name](), **overrides})


FAST_VARIANTS: dict[str, Any] = {
    "pi0_fast": lambda: {},
    "pi0_fast_tiny": lambda: {
        "vision": tiny_vision(),
        "paligemma": GemmaConfig(width=16, depth=2, mlp_dim=64, num_heads=8, num_kv_heads=1, head_dim=16),
    },
    # 1024 text ids + up to 383 FAST ids (offset 1407) + openpi's 128 skipped ids
    "pi0_fast_micro": lambda: {
        "vision": tiny_vision(112),
        "paligemma": tiny_gemma(),
        "vocab_size": 1536,
        "max_token_len": 128,
    },
}


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One draw per row of the categorical `probs` (B, V) from uniforms `u` (B,) in [0, 1): the first index whose
    cumulative probability exceeds u times the row total (float64 sums; zero-probability ids are never drawn)."""
    cdf = probs.double().cumsum(-1)
    target = (u.to(cdf.device).double() * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target, right=True)[:, 0].clamp_max(probs.shape[-1] - 1)


def sampling_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) in float32, the distribution tokens are sampled from (T = 1 when greedy). Sampling
    and `PI0FAST.action_logp` both use it, so the LOOP ratio compares like with like."""
    return F.log_softmax(logits.float() / (temperature if temperature > 0 else 1.0), -1)


class PI0FAST(nn.Module):
    def __init__(self, config: PI0FASTConfig):
        super().__init__()
        self.config = config
        self.vision = SiglipVision(config.vision, config.paligemma.width, config.layer_norm_eps)
        self.llm = JointGemma([config.paligemma], config.vocab_size, config.rms_norm_eps, adarms=[False])
        self.apply_dtype_policy(config.dtype)

    def apply_dtype_policy(self, dtype: str) -> PI0FAST:
        """float32, or bfloat16 with PI0's float32 islands (norms, patch and position embeddings)."""
        from pi0_lightning.model.pi0 import cast_with_float32_islands

        self.config.dtype = dtype  # type: ignore[assignment]
        cast_with_float32_islands(self, torch.bfloat16 if dtype == "bfloat16" else torch.float32)
        return self

    @classmethod
    def from_pretrained(cls, path, dtype: str | None = None, device="cpu") -> PI0FAST:
        from pi0_lightning.checkpoint import load_pretrained

        model = load_pretrained(path, dtype=dtype, device=device)
        if not isinstance(model, cls):
            raise TypeError(f"{path} holds a {type(model).__name__}, not a PI0-FAST model")
        return model

    def save_pretrained(self, path, **extra) -> None:
        from pi0_lightning.checkpoint import save_pretrained

        save_pretrained(self, path, **extra)

    def embed_inputs(self, obs: Observation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embeddings (B, S, W), input mask (B, S) and ar mask (B, S) of images followed by all text tokens."""
        if obs.token_ar_mask is None:
            raise ValueError("PI0-FAST needs token_ar_mask (0 on the prompt prefix, 1 on the action postfix)")
        img, img_mask = embed_images(self.vision, obs)
        dtype = self.llm.embed_tokens.weight.dtype
        tokens = torch.cat([img.to(dtype), self.llm.embed(obs.tokenized_prompt).to(dtype)], dim=1)
        input_mask = torch.cat([img_mask, obs.tokenized_prompt_mask.bool()], dim=1)
        ar = torch.cat([torch.zeros_like(img_mask, dtype=torch.long), obs.token_ar_mask.long()], dim=1)
        return tokens, input_mask, ar

    def pre_logits(self, obs: Observation) -> torch.Tensor:
        """Final-norm outputs (B, T-1, W) at the positions that predict text tokens 1..T-1."""
        tokens, input_mask, ar = self.embed_inputs(obs)
        attn = make_attn_mask(input_mask, ar)[:, :-1, :-1]
        s = tokens.shape[1] - 1
        positions = torch.arange(s, device=tokens.device)[None].expand(tokens.shape[0], -1)
        (out,), _ = self.llm([tokens[:, :-1]], positions, attn)
        t = obs.tokenized_prompt.shape[1] - 1
        return out[:, -t:]

    def logits(self, pre_logits: torch.Tensor) -> torch.Tensor:
        """Tied decoder: pre-logits times the token embedding in the table's dtype (as openpi's `jnp.dot`: bf16
        logits for a bf16 model), returned as float32. Never a float32 copy of the 257152-row table: that copy
        cost more than the rest of a decoding step and 4 GiB (weights + gradient) in training."""
        weight = self.llm.embed_tokens.weight
        return F.linear(pre_logits.to(weight.dtype), weight).float()

    def token_logp(self, obs: Observation) -> torch.Tensor:
        """log p(token_{i+1} | tokens_<=i, images) for i = 0..T-2: (B, T-1) float32 (the LOOP ratio's ingredient)."""
        logp = F.log_softmax(self.logits(self.pre_logits(obs)), dim=-1)
        return logp.gather(-1, obs.tokenized_prompt[:, 1:, None].long())[..., 0]

    def forward(self, obs: Observation) -> torch.Tensor:
        """Per-example loss (B,): masked mean NLL of the postfix tokens (openpi's compute_loss)."""
        if obs.token_loss_mask is None:
            raise ValueError("PI0-FAST training needs token_loss_mask (True on the action postfix)")
        mask = obs.token_loss_mask[:, 1:].float()
        return -(self.token_logp(obs) * mask).sum(-1) / mask.sum(-1).clamp(min=1)

    def _prefill(self, obs: Observation, max_decoding_steps: int) -> dict[str, Any]:
        """openpi's decode prefill: rolled (left-aligned) prefix into a cache with `max_decoding_steps` zero slots."""
        tokens, input_mask, ar = self.embed_inputs(obs)
        attn = make_attn_mask(input_mask, ar)
        b, s = input_mask.shape
        idx = torch.arange(s, device=tokens.device)
        # roll each row left by (last valid index + 1): its trailing padding moves to the front
        seqlen = (input_mask.long() * idx).max(-1).values + 1
        perm = (idx[None] + seqlen[:, None]) % s
        tokens = tokens.gather(1, perm[..., None].expand(-1, -1, tokens.shape[-1]))
        input_mask = input_mask.gather(1, perm)
        attn = attn.gather(1, perm[:, :, None].expand(-1, -1, s)).gather(2, perm[:, None, :].expand(-1, s, -1))
        positions = torch.cumsum(input_mask.long(), dim=1) - 1
        # openpi prefills into a cache of prefill + max_decoding_steps zero slots, and its fully masked rows (masked
        # cameras) spread a uniform softmax over all of them; later tokens attend to those rows' keys and values, so
        # the empty slots are reproduced here (as zero keys/values that every prefix row masks out)
        layer = self.llm.layers[0]
        empty = torch.zeros(
            b, layer.num_kv_heads, max_decoding_steps, layer.head_dim, dtype=tokens.dtype, device=tokens.device
        )
        no_slot = torch.zeros(b, s, max_decoding_steps, dtype=torch.bool, device=tokens.device)
        (out,), cache = self.llm(
            [tokens], positions, torch.cat([no_slot, attn], 2), kv_cache=[(empty, empty)] * len(self.llm.layers),
            return_kv=True,
        )  # fmt: skip
        prefill_len = input_mask.sum(-1)
        return {
            "cache": cache,
            "last": self.logits(out[:, -1]),
            "prefill_len": prefill_len,
            "prefix_start": s - prefill_len,
            "length": s,
            "dtype": tokens.dtype,
        }

    def _decode_mask(self, pre: dict[str, Any], num_new: int, done: int) -> torch.Tensor:
        """(B, num_new, length + done + num_new): decoded tokens see the prefix from its first valid token (a range,
        masked images inside it included, as openpi) and the decoded tokens up to themselves."""
        device = pre["last"].device
        slots = torch.arange(pre["length"] + done + num_new, device=device)
        prefix = slots[None, None] >= pre["prefix_start"][:, None, None]
        causal = slots[None] < (pre["length"] + done + 1 + torch.arange(num_new, device=device))[:, None]
        return prefix & causal[None]

    def decode_buffers(self, pre: dict[str, Any], max_decoding_steps: int) -> dict[str, Any]:
        """Static decoding state: per-layer K/V buffers with room for the prefix and `max_decoding_steps` tokens, the
        current token and the step counter as device tensors, loaded with the prefix (`load_prefix`). Every decoding
        step then has the same shapes (so it can be replayed as a CUDA graph, see `graphs.FASTGraphDecoder`)."""
        b, s = pre["last"].shape[0], pre["length"]
        cache = []
        for k, _ in pre["cache"]:
            big_k = k.new_zeros(b, k.shape[1], s + max_decoding_steps, k.shape[3])
            cache.append((big_k, torch.zeros_like(big_k)))
        device = pre["last"].device
        buf = {
            "cache": cache,
            "token": torch.zeros(b, dtype=torch.long, device=device),
            "step": torch.zeros((), dtype=torch.long, device=device),
            "prefill_len": torch.zeros_like(pre["prefill_len"]),
            "prefix_start": torch.zeros_like(pre["prefix_start"]),
            "length": s,
            "dtype": pre["dtype"],
        }
        return self.load_prefix(buf, pre)

    @staticmethod
    def load_prefix(buf: dict[str, Any], pre: dict[str, Any]) -> dict[str, Any]:
        """Copy a prefill's cache and row offsets into decoding buffers of the same shape (in place)."""
        s = pre["length"]
        for (k, v), (pk, pv) in zip(buf["cache"], pre["cache"], strict=True):
            k[:, :, :s].copy_(pk)
            v[:, :, :s].copy_(pv)
        buf["prefill_len"].copy_(pre["prefill_len"])
        buf["prefix_start"].copy_(pre["prefix_start"])
        return buf

    def decode_step(self, buf: dict[str, Any]) -> torch.Tensor:
        """Embed `buf["token"]` as decoded token number `buf["step"]`, write its keys/values into the cache and
        return the next token's float32 logits (B, V). Slots not yet written are masked out (weight exactly 0), so
        this equals attending to a growing cache."""
        s = buf["length"]
        total = buf["cache"][0][0].shape[2]
        emb = self.llm.embed(buf["token"][:, None]).to(buf["dtype"])
        pos = (buf["prefill_len"] + buf["step"] + 1)[:, None]
        slots = torch.arange(total, device=emb.device)[None]
        seen = (slots >= buf["prefix_start"][:, None]) & (slots < s + buf["step"])
        mask = torch.cat([seen, torch.ones_like(seen[:, :1])], 1)[:, None, :]  # the new token sees itself last
        (out,), new = self.llm([emb], pos, mask, kv_cache=buf["cache"], return_kv=True)
        slot = (s + buf["step"]).view(1)
        for (k, v), (nk, nv) in zip(buf["cache"], new, strict=True):
            k.index_copy_(2, slot, nk)
            v.index_copy_(2, slot, nv)
        return self.logits(out[:, -1])

    @torch.no_grad()
    def sample_tokens(
        self,
        obs: Observation,
        max_decoding_steps: int = 256,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
        return_logits: bool = False,
        return_logp: bool = False,
        decoder: Any = None,
        uniforms: torch.Tensor | None = None,
    ) -> Any:
        """Decode action tokens after the prompt: (B, max_decoding_steps) long, zeros after the stop.

        Sampling (`temperature` > 0) draws from `generator` for the whole batch, or, with `uniforms`
        ((B, max_decoding_steps) in [0, 1)), row k's token at step t by inverse CDF from uniforms[k, t], so that a row's
        tokens do not depend on the other rows.

        With `return_logits`, also the full-vocabulary logits each token was chosen from (one (B, V) per step); with
        `return_logp`, also each token's log-probability under the sampling distribution softmax(logits / T)
        (T = 1 when greedy), (B, max_decoding_steps) float32: the LOOP ratio's log pi_old. `decoder` replaces the
        eager steps (`prepare(pre, steps) -> buffers`, `step(buffers) -> logits`), e.g. a CUDA-graph replay.
        """
        pre = self._prefill(obs, max_decoding_steps)
        if decoder is None:
            buf, step_fn = self.decode_buffers(pre, max_decoding_steps), self.decode_step
        else:
            buf, step_fn = decoder.prepare(pre, max_decoding_steps), decoder.step
        b = pre["last"].shape[0]
        device, last = pre["last"].device, pre["last"]
        output = torch.zeros(b, max_decoding_steps, dtype=torch.long, device=device)
        logp = torch.zeros(b, max_decoding_steps, dtype=torch.float32, device=device)
        step_logits = []
        for step in range(max_decoding_steps):
            if return_logits:
                step_logits.append(last.clone())
            logprobs = sampling_logprobs(last, temperature)
            if temperature > 0 and uniforms is not None:
                token = inverse_cdf(logprobs.exp(), uniforms[:, step])
            elif temperature > 0:
                token = torch.multinomial(logprobs.exp(), 1, generator=generator)[:, 0]
            else:
                token = last.argmax(-1)
            output[:, step] = token
            logp[:, step] = logprobs.gather(-1, token[:, None])[:, 0]
            if bool((token == EOS_ID).all()):
                break
            buf["token"].copy_(token)
            buf["step"].fill_(step)
            last = step_fn(buf)
        result: tuple = (output,)
        if return_logits:
            result += (step_logits,)
        if return_logp:
            result += (logp,)
        return result if len(result) > 1 else output

    def action_logp(
        self,
        obs: Observation,
        tokens: torch.Tensor,
        temperature: float = 1.0,
        max_decoding_steps: int = 256,
    ) -> torch.Tensor:
        """log pi(token_i | prompt, tokens_<i) of decoded tokens (B, N) in one teacher-forced pass, laid out exactly
        as `sample_tokens` decodes them (rolled prefix, zero slots, the position gap, range mask), so at unchanged
        weights it equals the log-probs recorded while sampling. (B, N) float32, differentiable."""
        pre = self._prefill(obs, max_decoding_steps)
        n = tokens.shape[1]
        logits = [pre["last"][:, None]]
        if n > 1:
            emb = self.llm.embed(tokens[:, :-1]).to(pre["dtype"])
            pos = pre["prefill_len"][:, None] + 1 + torch.arange(n - 1, device=emb.device)[None]
            (out,), _ = self.llm([emb], pos, self._decode_mask(pre, n - 1, 0), kv_cache=pre["cache"])
            logits.append(self.logits(out))
        return sampling_logprobs(torch.cat(logits, 1), temperature).gather(-1, tokens[..., None].long())[..., 0]
