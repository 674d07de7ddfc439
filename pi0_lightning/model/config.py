"""Model configuration: sizes of the SigLIP tower, the two Gemma experts, and the PI0 / PI0.5 heads.

Every dimension the model uses comes from here (and the converters fill it from checkpoint shapes), so nothing
assumes the real sizes or the test fixtures' sizes. Named variants follow openpi: `pi0` and `pi05` are the real
models (SigLIP So400m/14 + Gemma 2B + Gemma 300M), `dummy` is openpi's dummy Gemma with the real SigLIP.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

PALIGEMMA_VOCAB_SIZE = 257_152
IMAGE_KEYS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


@dataclass
class GemmaConfig:
    """One Gemma expert (a stack of decoder layers sharing attention with the other experts)."""

    width: int = 2048
    """Residual stream width D."""
    depth: int = 18
    """Number of layers; all experts of one model must have the same depth."""
    mlp_dim: int = 16_384
    """Hidden width of the GeGLU MLP."""
    num_heads: int = 8
    """Query heads; shared by all experts."""
    num_kv_heads: int = 1
    """Key/value heads (grouped-query attention); shared by all experts."""
    head_dim: int = 256
    """Per-head width H; width need not equal num_heads * head_dim."""


GEMMA_VARIANTS: dict[str, GemmaConfig] = {
    "dummy": GemmaConfig(width=64, depth=4, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16),
    "gemma_300m": GemmaConfig(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256),
    "gemma_2b": GemmaConfig(width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256),
}


@dataclass
class SiglipConfig:
    """SigLIP vision tower (ViT with learned position embedding, no pooling) followed by a linear head."""

    width: int = 1152
    depth: int = 27
    mlp_dim: int = 4304
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 224

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def coerce_sub_configs(config: Any, **types: type) -> None:
    """Nested configs given as dicts (from config.json or YAML) become their dataclasses."""
    for name, cls in types.items():
        value = getattr(config, name)
        if isinstance(value, dict):
            setattr(config, name, cls(**value))


@dataclass
class PI0Config:
    """PI0 / PI0.5: SigLIP + PaliGemma LLM + action expert, trained by flow matching."""

    pi05: bool = False
    """PI0.5: no state token; time enters the action expert through adaptive RMSNorm."""
    vision: SiglipConfig = field(default_factory=SiglipConfig)
    """SigLIP tower; its head projects to `paligemma.width`."""
    paligemma: GemmaConfig = field(default_factory=lambda: dataclasses.replace(GEMMA_VARIANTS["gemma_2b"]))
    """The PaliGemma language model (expert 0); it owns the token embedding."""
    action_expert: GemmaConfig = field(default_factory=lambda: dataclasses.replace(GEMMA_VARIANTS["gemma_300m"]))
    """The action expert (expert 1)."""
    vocab_size: int = PALIGEMMA_VOCAB_SIZE
    """Rows of the token embedding."""
    action_dim: int = 32
    """Model action (and state) dimension; robot actions are zero-padded to it."""
    action_horizon: int = 50
    """Actions per chunk H."""
    max_token_len: int = 48
    """Prompt length L the tokenizer pads to (48 for pi0, 200 for pi05)."""
    num_cameras: int = 3
    """Images per observation, in `IMAGE_KEYS` order."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype. bfloat16 follows openpi: norms, patch/position embeddings and the action/state/time
    projections stay float32."""
    time_beta_alpha: float = 1.5
    time_beta_beta: float = 1.0
    """Training time t ~ Beta(alpha, beta) * 0.999 + 0.001 (t=1 is noise)."""
    num_cfg_conditions: int = 0
    """Size of the learned advantage-condition embedding in the action expert (0 = none; see rl/)."""
    rms_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        coerce_sub_configs(self, vision=SiglipConfig, paligemma=GemmaConfig, action_expert=GemmaConfig)
        a, b = self.paligemma, self.action_expert
        for name in ("depth", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(a, name) != getattr(b, name):
                raise ValueError(
                    f"paligemma and action_expert must share {name}: {getattr(a, name)} vs {getattr(b, name)}"
                )
        if a.num_heads % a.num_kv_heads:
            raise ValueError(f"num_heads {a.num_heads} is not a multiple of num_kv_heads {a.num_kv_heads}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")

    @property
    def num_image_tokens(self) -> int:
        return self.num_cameras * self.vision.num_patches

    @property
    def prefix_len(self) -> int:
        return self.num_image_tokens + self.max_token_len

    @property
    def suffix_len(self) -> int:
        return self.action_horizon + (0 if self.pi05 else 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PI0Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown PI0Config fields: {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def variant(cls, name: str, **overrides: Any) -> PI0Config:
        """Named sizes: `pi0`, `pi05` (real), `pi0_dummy` / `pi05_dummy` (openpi's dummy Gemma, real SigLIP),
        `pi0_tiny` / `pi05_tiny` (tiny everything, for tests and CPU demos), `pi0_micro` (pi0_tiny at 112 px),
        `pi0_small` (~40M parameters, random-init learning on one GPU)."""
        if name not in VARIANTS:
            raise ValueError(f"unknown PI0 variant {name!r}; choose from {', '.join(sorted(VARIANTS))}")
        return cls(**{**VARIANTS[name](), **overrides})


def tiny_vision(image_size: int = 224) -> SiglipConfig:
    """The SigLIP of the tiny test / demo variants (PI0 and PI0-FAST)."""
    return SiglipConfig(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=14, image_size=image_size)


def tiny_gemma() -> GemmaConfig:
    """The Gemma of the tiny test / demo variants (PI0's PaliGemma expert, PI0-FAST micro)."""
    return GemmaConfig(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=1, head_dim=16)


# A random tiny model gets a small SentencePiece tokenizer trained on its few instructions (policy/assets.py). With
# so little text it splits prompts almost into characters: LIBERO's instructions take up to 76 ids there, where
# PaliGemma's vocabulary keeps them within openpi's 48. No id covers less than one character of ASCII text, so a
# prompt needs at most len(instruction) + 2 ids (BOS, the "\n" answer cue): 96 holds LIBERO's longest (88
# characters) whichever tasks the tokenizer was trained on.
TINY_MAX_TOKEN_LEN = 96

VARIANTS: dict[str, Any] = {
    "pi0": lambda: {},
    "pi05": lambda: {"pi05": True, "max_token_len": 200},
    "pi0_dummy": lambda: {
        "paligemma": dataclasses.replace(GEMMA_VARIANTS["dummy"]),
        "action_expert": dataclasses.replace(GEMMA_VARIANTS["dummy"]),
    },
    "pi05_dummy": lambda: {
        "pi05": True,
        "max_token_len": 200,
        "paligemma": dataclasses.replace(GEMMA_VARIANTS["dummy"]),
        "action_expert": dataclasses.replace(GEMMA_VARIANTS["dummy"]),
    },
    "pi0_tiny": lambda: {
        "vision": tiny_vision(),
        "paligemma": tiny_gemma(),
        "action_expert": dataclasses.replace(tiny_gemma(), width=32, mlp_dim=64),
        "vocab_size": 1024,
        "max_token_len": TINY_MAX_TOKEN_LEN,
    },
    "pi05_tiny": lambda: {
        "pi05": True,
        "vision": tiny_vision(),
        "paligemma": tiny_gemma(),
        "action_expert": dataclasses.replace(tiny_gemma(), width=32, mlp_dim=64),
        "vocab_size": 1024,
        "max_token_len": TINY_MAX_TOKEN_LEN,  # LIBERO prompts carry no state here either (policy/pi0_libero.py)
    },
}
VARIANTS["pi0_micro"] = lambda: {  # pi0_tiny at 112x112 pixels (64 patches per camera): the CPU learning proof
    **VARIANTS["pi0_tiny"](),
    "vision": tiny_vision(112),
    "max_token_len": 16,
}
VARIANTS["pi0_small"] = lambda: {  # ~40M parameters: trains from random init on one GPU in minutes (LIBERO proof)
    "vision": SiglipConfig(width=384, depth=6, mlp_dim=1536, num_heads=6, patch_size=14, image_size=224),
    "paligemma": GemmaConfig(width=512, depth=6, mlp_dim=2048, num_heads=8, num_kv_heads=1, head_dim=64),
    "action_expert": GemmaConfig(width=256, depth=6, mlp_dim=1024, num_heads=8, num_kv_heads=1, head_dim=64),
    "vocab_size": 1024,
    "max_token_len": TINY_MAX_TOKEN_LEN,
}
VARIANTS["dummy"] = VARIANTS["pi0_dummy"]
