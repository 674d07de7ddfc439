"""openpi (JAX) parameter tree -> pi0_lightning state dict.

The tree is read from the orbax checkpoint by `orbax.read_openpi_params` (flat '/'-joined names, `/value` stripped).
Every size comes from the arrays' shapes; PI0 vs PI0.5 is detected from the tree (`time_mlp_in` and adaptive
`Dense_0` norms vs `state_proj`), never from the path. The weight transforms are the generic ones (openpi's own
converter has an o_proj reshape that is only right when width == heads * head_dim).

Layouts: flax `Dense` kernels are (in, out) -> torch `weight = kernel.T`; layers are stacked on axis 0 by `nn.scan`;
`q_einsum` is (N, D, H), `kv_einsum` (2, K, D, H), `attn_vec_einsum` (N, H, D), `gating_einsum` (2, D, F) with index 0
the GELU-gated branch; SigLIP attention kernels are (D, heads, head_dim) and its patch kernel HWIO.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pi0_lightning.convert.errors import ConversionError
from pi0_lightning.convert.orbax import to_torch
from pi0_lightning.model.config import GemmaConfig, PI0Config, SiglipConfig
from pi0_lightning.model.pi0_fast import PI0FASTConfig

IMG = "PaliGemma/img"
LLM = "PaliGemma/llm"
ENC = f"{IMG}/Transformer/encoderblock"


def _get(params: dict[str, np.ndarray], key: str) -> np.ndarray:
    if key not in params:
        raise ConversionError(f"openpi checkpoint is missing parameter {key!r}")
    return params[key]


def detect_kind(params: dict[str, np.ndarray]) -> str:
    """'pi0', 'pi05' or 'pi0_fast' from the keys present."""
    if f"{LLM}/layers/attn/q_einsum_1/w" not in params:
        if f"{LLM}/layers/attn/q_einsum/w" in params:
            return "pi0_fast"
        raise ConversionError("not a PI0 parameter tree: no PaliGemma/llm/layers/attn/q_einsum/w")
    if "time_mlp_in/kernel" in params:
        return "pi05"
    if "state_proj/kernel" in params:
        return "pi0"
    raise ConversionError("cannot tell PI0 from PI0.5: neither state_proj nor time_mlp_in is present")


def _gemma_config(params: dict[str, np.ndarray], sfx: str) -> GemmaConfig:
    depth, n, d, h = _get(params, f"{LLM}/layers/attn/q_einsum{sfx}/w").shape
    k = _get(params, f"{LLM}/layers/attn/kv_einsum{sfx}/w").shape[2]
    f = _get(params, f"{LLM}/layers/mlp{sfx}/linear").shape[1]
    return GemmaConfig(width=d, depth=depth, mlp_dim=f, num_heads=n, num_kv_heads=k, head_dim=h)


def infer_config(params: dict[str, np.ndarray], **overrides) -> PI0Config:
    """Model config from parameter shapes. The action horizon and prompt length are not in the weights:
    defaults are openpi's (50; 48 for pi0, 200 for pi05) unless overridden."""
    kind = detect_kind(params)
    if kind == "pi0_fast":
        raise ConversionError(
            "PI0-FAST checkpoints cannot be converted to a checkpoint directory yet (single-expert tree detected)"
        )
    vision = _vision_config(params)
    pi05 = kind == "pi05"
    cfg = {
        "pi05": pi05,
        "vision": vision,
        "paligemma": _gemma_config(params, ""),
        "action_expert": _gemma_config(params, "_1"),
        "vocab_size": _get(params, f"{LLM}/embedder/input_embedding").shape[0],
        "action_dim": _get(params, "action_in_proj/kernel").shape[0],
        "max_token_len": 200 if pi05 else 48,
    }
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return PI0Config(**cfg)


def _vision_config(params: dict[str, np.ndarray]) -> SiglipConfig:
    kh, kw, _, width = _get(params, f"{IMG}/embedding/kernel").shape
    num_patches = _get(params, f"{IMG}/pos_embedding").shape[1]
    return SiglipConfig(
        width=width,
        depth=_get(params, f"{ENC}/LayerNorm_0/scale").shape[0],
        mlp_dim=_get(params, f"{ENC}/MlpBlock_0/Dense_0/kernel").shape[-1],
        num_heads=_get(params, f"{ENC}/MultiHeadDotProductAttention_0/query/kernel").shape[2],
        patch_size=kh,
        image_size=int(math.isqrt(num_patches)) * kh,
    )


def infer_fast_config(params: dict[str, np.ndarray], **overrides) -> PI0FASTConfig:
    """PI0-FAST config from parameter shapes (single Gemma, no action heads)."""
    if detect_kind(params) != "pi0_fast":
        raise ConversionError("not a PI0-FAST parameter tree (it has an action expert)")
    cfg = {
        "vision": _vision_config(params),
        "paligemma": _gemma_config(params, ""),
        "vocab_size": _get(params, f"{LLM}/embedder/input_embedding").shape[0],
    }
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return PI0FASTConfig(**cfg)


def _t(a: np.ndarray) -> torch.Tensor:
    return to_torch(np.ascontiguousarray(a))


def openpi_to_state_dict(params: dict[str, np.ndarray], config: PI0Config | PI0FASTConfig) -> dict[str, torch.Tensor]:
    """Map every openpi leaf to our names; raises on leaves it does not know (none may be silently dropped)."""
    fast = isinstance(config, PI0FASTConfig)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        used.add(key)
        return _get(params, key)

    # --- SigLIP
    out["vision.patch_embed.weight"] = _t(take(f"{IMG}/embedding/kernel").transpose(3, 2, 0, 1))
    out["vision.patch_embed.bias"] = _t(take(f"{IMG}/embedding/bias"))
    out["vision.pos_embed"] = _t(take(f"{IMG}/pos_embedding"))
    for i in range(config.vision.depth):
        p = f"vision.blocks.{i}"
        for ln, name in (("LayerNorm_0", "norm1"), ("LayerNorm_1", "norm2")):
            out[f"{p}.{name}.weight"] = _t(take(f"{ENC}/{ln}/scale")[i])
            out[f"{p}.{name}.bias"] = _t(take(f"{ENC}/{ln}/bias")[i])
        for dense, name in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            out[f"{p}.mlp.{name}.weight"] = _t(take(f"{ENC}/MlpBlock_0/{dense}/kernel")[i].T)
            out[f"{p}.mlp.{name}.bias"] = _t(take(f"{ENC}/MlpBlock_0/{dense}/bias")[i])
        mha = f"{ENC}/MultiHeadDotProductAttention_0"
        for jax_name, name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            k = take(f"{mha}/{jax_name}/kernel")[i]  # (D, heads, head_dim)
            out[f"{p}.attn.{name}.weight"] = _t(k.reshape(k.shape[0], -1).T)
            out[f"{p}.attn.{name}.bias"] = _t(take(f"{mha}/{jax_name}/bias")[i].reshape(-1))
        k = take(f"{mha}/out/kernel")[i]  # (heads, head_dim, D)
        out[f"{p}.attn.out_proj.weight"] = _t(k.reshape(-1, k.shape[-1]).T)
        out[f"{p}.attn.out_proj.bias"] = _t(take(f"{mha}/out/bias")[i])
    out["vision.norm.weight"] = _t(take(f"{IMG}/Transformer/encoder_norm/scale"))
    out["vision.norm.bias"] = _t(take(f"{IMG}/Transformer/encoder_norm/bias"))
    out["vision.head.weight"] = _t(take(f"{IMG}/head/kernel").T)
    out["vision.head.bias"] = _t(take(f"{IMG}/head/bias"))

    # --- Gemma experts
    out["llm.embed_tokens.weight"] = _t(take(f"{LLM}/embedder/input_embedding"))
    adarms = (False,) if fast else (False, config.pi05)
    for e, sfx in enumerate(("",) if fast else ("", "_1")):
        for i in range(config.paligemma.depth):
            p = f"llm.layers.{i}.experts.{e}"
            q = take(f"{LLM}/layers/attn/q_einsum{sfx}/w")[i]  # (N, D, H)
            out[f"{p}.q_proj.weight"] = _t(q.transpose(0, 2, 1).reshape(-1, q.shape[1]))
            kv = take(f"{LLM}/layers/attn/kv_einsum{sfx}/w")[i]  # (2, K, D, H)
            out[f"{p}.k_proj.weight"] = _t(kv[0].transpose(0, 2, 1).reshape(-1, kv.shape[2]))
            out[f"{p}.v_proj.weight"] = _t(kv[1].transpose(0, 2, 1).reshape(-1, kv.shape[2]))
            o = take(f"{LLM}/layers/attn/attn_vec_einsum{sfx}/w")[i]  # (N, H, D)
            out[f"{p}.o_proj.weight"] = _t(o.reshape(-1, o.shape[-1]).T)
            g = take(f"{LLM}/layers/mlp{sfx}/gating_einsum")[i]  # (2, D, F)
            out[f"{p}.mlp.gate_proj.weight"] = _t(g[0].T)
            out[f"{p}.mlp.up_proj.weight"] = _t(g[1].T)
            out[f"{p}.mlp.down_proj.weight"] = _t(take(f"{LLM}/layers/mlp{sfx}/linear")[i].T)
            for jax_norm, name in (("pre_attention_norm", "attn_norm"), ("pre_ffw_norm", "ffn_norm")):
                if adarms[e]:
                    out[f"{p}.{name}.dense.weight"] = _t(take(f"{LLM}/layers/{jax_norm}{sfx}/Dense_0/kernel")[i].T)
                    out[f"{p}.{name}.dense.bias"] = _t(take(f"{LLM}/layers/{jax_norm}{sfx}/Dense_0/bias")[i])
                else:
                    out[f"{p}.{name}.weight"] = _t(take(f"{LLM}/layers/{jax_norm}{sfx}/scale")[i])
        if adarms[e]:
            out[f"llm.norms.{e}.dense.weight"] = _t(take(f"{LLM}/final_norm{sfx}/Dense_0/kernel").T)
            out[f"llm.norms.{e}.dense.bias"] = _t(take(f"{LLM}/final_norm{sfx}/Dense_0/bias"))
        else:
            out[f"llm.norms.{e}.weight"] = _t(take(f"{LLM}/final_norm{sfx}/scale"))

    # --- projections (top level, same names as openpi)
    if fast:
        heads = []
    elif config.pi05:
        heads = ["action_in_proj", "action_out_proj", "time_mlp_in", "time_mlp_out"]
    else:
        heads = ["action_in_proj", "action_out_proj", "state_proj", "action_time_mlp_in", "action_time_mlp_out"]
    for name in heads:
        out[f"{name}.weight"] = _t(take(f"{name}/kernel").T)
        out[f"{name}.bias"] = _t(take(f"{name}/bias"))

    leftover = sorted(set(params) - used)
    if leftover:
        shown = ", ".join(leftover[:10]) + (f" (+{len(leftover) - 10} more)" if len(leftover) > 10 else "")
        raise ConversionError(f"unknown openpi parameter(s) {shown} (LoRA checkpoints must be merged first)")
    return out
