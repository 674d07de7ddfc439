"""The model-space observation: what PI0 consumes after the policy transforms (normalised, padded, tokenised)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Observation:
    """A batch of model inputs.

    images: camera name -> (B, 3, 224, 224) float in [-1, 1], in `IMAGE_KEYS` order.
    image_masks: camera name -> (B,) bool; a False camera's tokens are excluded from attention.
    state: (B, action_dim) normalised and zero-padded proprioceptive state.
    tokenized_prompt: (B, L) long, right-padded; tokenized_prompt_mask: (B, L) bool.
    token_ar_mask, token_loss_mask: (B, L), PI0-FAST only (1 / True on the action postfix).
    """

    images: dict[str, torch.Tensor]
    image_masks: dict[str, torch.Tensor]
    state: torch.Tensor
    tokenized_prompt: torch.Tensor
    tokenized_prompt_mask: torch.Tensor
    token_ar_mask: torch.Tensor | None = None
    token_loss_mask: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.state.shape[0]

    def to(self, device: torch.device | str) -> Observation:
        return Observation(
            images={k: v.to(device) for k, v in self.images.items()},
            image_masks={k: v.to(device) for k, v in self.image_masks.items()},
            state=self.state.to(device),
            tokenized_prompt=self.tokenized_prompt.to(device),
            tokenized_prompt_mask=self.tokenized_prompt_mask.to(device),
            token_ar_mask=None if self.token_ar_mask is None else self.token_ar_mask.to(device),
            token_loss_mask=None if self.token_loss_mask is None else self.token_loss_mask.to(device),
        )

    def index(self, idx: torch.Tensor | slice) -> Observation:
        """Select batch elements (a slice, an index tensor or a boolean mask)."""
        return Observation(
            images={k: v[idx] for k, v in self.images.items()},
            image_masks={k: v[idx] for k, v in self.image_masks.items()},
            state=self.state[idx],
            tokenized_prompt=self.tokenized_prompt[idx],
            tokenized_prompt_mask=self.tokenized_prompt_mask[idx],
            token_ar_mask=None if self.token_ar_mask is None else self.token_ar_mask[idx],
            token_loss_mask=None if self.token_loss_mask is None else self.token_loss_mask[idx],
        )

    @staticmethod
    def cat(observations: list[Observation]) -> Observation:
        first = observations[0]
        return Observation(
            images={k: torch.cat([o.images[k] for o in observations]) for k in first.images},
            image_masks={k: torch.cat([o.image_masks[k] for o in observations]) for k in first.image_masks},
            **{
                f.name: torch.cat([getattr(o, f.name) for o in observations])
                for f in fields(Observation)
                if f.name in ("state", "tokenized_prompt", "tokenized_prompt_mask")
            },
            **{
                name: torch.cat([getattr(o, name) for o in observations])
                for name in ("token_ar_mask", "token_loss_mask")
                if getattr(first, name) is not None
            },
        )


def random_observation(config, batch_size: int = 2, seed: int = 0, prompt_lens: list[int] | None = None) -> Observation:
    """Random model-space inputs for a PI0 config (tests, benchmarks): images in [-1, 1], the third camera masked as
    in LIBERO, right-padded prompts of `prompt_lens` tokens (default 5, 8, 11, ...)."""
    from pi0_lightning.model.config import IMAGE_KEYS

    g = torch.Generator().manual_seed(seed)
    size = config.vision.image_size
    lens = prompt_lens or [min(5 + 3 * i, config.max_token_len) for i in range(batch_size)]
    mask = torch.arange(config.max_token_len)[None] < torch.tensor(lens)[:, None]
    tokens = torch.randint(3, config.vocab_size, (batch_size, config.max_token_len), generator=g) * mask
    return Observation(
        images={k: torch.rand(batch_size, 3, size, size, generator=g) * 2 - 1 for k in IMAGE_KEYS},
        image_masks={k: torch.full((batch_size,), k != "right_wrist_0_rgb") for k in IMAGE_KEYS},
        state=torch.randn(batch_size, config.action_dim, generator=g),
        tokenized_prompt=tokens,
        tokenized_prompt_mask=mask,
    )
