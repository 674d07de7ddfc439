"""SigLIP vision tower as openpi uses it: ViT, learned position embedding, no pooling, a linear head to the LLM width.

Numerics follow openpi's `siglip.py`: the patch convolution and the position embedding run in float32 and the result
is cast to the compute dtype; LayerNorm (eps 1e-6) normalises in float32; GELU is the tanh approximation; image
tokens are *not* scaled by sqrt(width) (vanilla HF PaliGemma divides, openpi does not).

`SiglipBlock` is the unit that activation checkpointing and compilation (`speed.py`) apply to from outside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pi0_lightning.model.config import SiglipConfig


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the activation dtype; the output is cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class SiglipAttention(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"SigLIP width {width} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = (p(x).view(b, s, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, d))


class SiglipMLP(nn.Module):
    def __init__(self, width: int, mlp_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fc1's bias is added with the GELU, in one elementwise kernel when compiled: as cuBLAS's bias epilogue,
        # inductor first copied it into a full (rows, mlp_dim) matrix, a kernel of its own per block on an H100
        h = F.linear(x, self.fc1.weight) + self.fc1.bias
        return self.fc2(F.gelu(h, approximate="tanh"))


class SiglipBlock(nn.Module):
    def __init__(self, cfg: SiglipConfig, eps: float):
        super().__init__()
        self.norm1 = LayerNorm32(cfg.width, eps=eps)
        self.attn = SiglipAttention(cfg.width, cfg.num_heads)
        self.norm2 = LayerNorm32(cfg.width, eps=eps)
        self.mlp = SiglipMLP(cfg.width, cfg.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SiglipVision(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> tokens (B, num_patches, out_dim)."""

    def __init__(self, cfg: SiglipConfig, out_dim: int, eps: float = 1e-6):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_patches, cfg.width) / cfg.width**0.5)
        self.blocks = nn.ModuleList(SiglipBlock(cfg, eps) for _ in range(cfg.depth))
        self.norm = LayerNorm32(cfg.width, eps=eps)
        self.head = nn.Linear(cfg.width, out_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = self.head.weight.dtype
        # openpi computes the stem in float32 "to be safe", then casts to the matmul dtype
        w = self.patch_embed.weight.float()
        b = self.patch_embed.bias.float()
        x = F.conv2d(images.float(), w, b, stride=self.cfg.patch_size)
        x = x.flatten(2).transpose(1, 2) + self.pos_embed.float()
        x = x.to(dtype)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
