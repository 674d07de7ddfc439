"""PI0-FAST (openpi `pi0_fast.py`): SigLIP + one PaliGemma Gemma, actions as discrete FAST tokens.

The sequence is the images' tokens then the tokenised text (prefix `Task: ..., State: ...;\\n` with ar = 0, postfix
`Action: <FAST tokens>|<eos>` with ar = 1, so the postfix is causal and the prefix bidirectional). Training is
next-token cross-entropy on the postfix only: the model sees the embeddings without the last token, positions are
0..T-2 (arange, padding included, as openpi's training path), and logits are pre-logits times the tied embedding.

Status: the training forward (per-token log-probabilities, logits, the loss) matches openpi; autoregressive decoding
with openpi's left-aligned prefill and position gap, the FAST action tokenizer and the LOOP RL loss are not written
yet (tracked in the PI0-FAST issue).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pi0_lightning.model.config import IMAGE_KEYS, PALIGEMMA_VOCAB_SIZE, GemmaConfig, SiglipConfig
from pi0_lightning.model.gemma import JointGemma
from pi0_lightning.model.observation import Observation
from pi0_lightning.model.pi0 import make_attn_mask
from pi0_lightning.model.siglip import SiglipVision


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
        if config.dtype == "bfloat16":
            self.to(torch.bfloat16)
            for m in self.modules():  # norms and the patch/position embeddings stay float32, as in PI0
                if m.__class__.__name__ in ("RMSNorm", "LayerNorm32"):
                    m.float()
            self.vision.patch_embed.float()
            self.vision.pos_embed.data = self.vision.pos_embed.data.float()

    def embed_inputs(self, obs: Observation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embeddings (B, S, W), input mask (B, S) and ar mask (B, S) of images followed by all text tokens."""
        if obs.token_ar_mask is None:
            raise ValueError("PI0-FAST needs token_ar_mask (0 on the prompt prefix, 1 on the action postfix)")
        keys = [k for k in IMAGE_KEYS if k in obs.images]
        b = obs.batch_size
        img = self.vision(torch.cat([obs.images[k] for k in keys]))
        n = img.shape[1]
        img = img.view(len(keys), b, n, -1).transpose(0, 1).reshape(b, len(keys) * n, -1)
        dtype = self.llm.embed_tokens.weight.dtype
        tokens = torch.cat([img.to(dtype), self.llm.embed(obs.tokenized_prompt).to(dtype)], dim=1)
        img_mask = torch.stack([obs.image_masks[k].bool() for k in keys], dim=1).repeat_interleave(n, dim=1)
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
