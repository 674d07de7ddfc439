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

Status: training forward and greedy/temperature decoding match openpi on the tiny fixture; the FAST action
tokenizer and the LOOP RL loss are not written yet (tracked in the PI0-FAST issue).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pi0_lightning.model.config import PALIGEMMA_VOCAB_SIZE, GemmaConfig, SiglipConfig
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
        if isinstance(self.vision, dict):
            self.vision = SiglipConfig(**self.vision)
        if isinstance(self.paligemma, dict):
            self.paligemma = GemmaConfig(**self.paligemma)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
        """Tied decoder: pre-logits times the token embedding, in float32."""
        return pre_logits.float() @ self.llm.embed_tokens.weight.float().t()

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

    @torch.no_grad()
    def sample_tokens(
        self,
        obs: Observation,
        max_decoding_steps: int = 256,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
        return_logits: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Decode action tokens after the prompt: (B, max_decoding_steps) long, zeros after the stop.

        With `return_logits`, also the full-vocabulary logits each token was chosen from (one (B, V) per step).
        """
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
        prefill_len = input_mask.sum(-1)
        prefix_start = s - prefill_len
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
        last = self.logits(out[:, -1])
        output = torch.zeros(b, max_decoding_steps, dtype=torch.long, device=tokens.device)
        step_logits = []
        for step in range(max_decoding_steps):
            step_logits.append(last)
            if temperature > 0:
                token = torch.multinomial(F.softmax(last / temperature, -1), 1, generator=generator)[:, 0]
            else:
                token = last.argmax(-1)
            output[:, step] = token
            if bool((token == EOS_ID).all()):
                break
            emb = self.llm.embed(token[:, None]).to(tokens.dtype)
            pos = (prefill_len + step + 1)[:, None]
            slots = torch.arange(s + step + 1, device=tokens.device)
            mask = (slots[None] >= prefix_start[:, None])[:, None, :]
            (out,), new = self.llm([emb], pos, mask, kv_cache=cache, return_kv=True)
            cache = [
                (torch.cat([k, nk], 2), torch.cat([v, nv], 2)) for (k, v), (nk, nv) in zip(cache, new, strict=True)
            ]
            last = self.logits(out[:, -1])
        return (output, step_logits) if return_logits else output
