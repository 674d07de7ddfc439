"""openpi-PyTorch / LeRobot safetensors <-> pi0_lightning state dict.

Key layouts handled (facts from openpi's `pi0_pytorch.py` and LeRobot's `modeling_pi0.py`):
- openpi-PyTorch: `paligemma_with_expert.paligemma.model.{vision_tower,multi_modal_projector,language_model}...`,
  `paligemma_with_expert.gemma_expert.model...`, top-level projections. Saved with `lm_head.weight` and *without*
  `embed_tokens.weight` (safetensors drops one of two tied tensors).
- current LeRobot: the same keys with a `model.` prefix.
- old LeRobot port (transformers 4.48): `paligemma.vision_tower`, `paligemma.multi_modal_projector`,
  `paligemma.language_model.model.*`, `paligemma.language_model.lm_head`; also normaliser buffers.

Attention head counts and head_dim are not visible in HF-style weight shapes (q_proj is (heads * head_dim, width)),
so they come from, in order: a `pi0_lightning` section that `export-lerobot` writes into `config.json`, the Gemma
variant names in `config.json`, explicit overrides, then the real models' values (head_dim 256, SigLIP 16 heads).

LeRobot's PI0 has no advantage-condition embedding (`cfg_embed`, added by RL with CFG): the export folds the
positive condition into a bias (`fold_cfg_condition`), which keeps the guidance w = 1 policy exactly and loses w != 1.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from pi0_lightning.convert.errors import ConversionError
from pi0_lightning.model.config import GEMMA_VARIANTS, GemmaConfig, PI0Config, SiglipConfig
from pi0_lightning.model.pi0 import COND_POSITIVE

PWE = "paligemma_with_expert."
VISION = PWE + "paligemma.model.vision_tower.vision_model."
PROJECTOR = PWE + "paligemma.model.multi_modal_projector.linear."
LM = PWE + "paligemma.model.language_model."
EXPERT = PWE + "gemma_expert.model."
LM_HEAD = PWE + "paligemma.lm_head.weight"
EXPERT_LM_HEAD = PWE + "gemma_expert.lm_head.weight"

# old LeRobot layout -> current (order matters: most specific first)
_OLD_TO_NEW = (
    (PWE + "paligemma.language_model.model.", LM),
    (PWE + "paligemma.language_model.lm_head.", PWE + "paligemma.lm_head."),
    (PWE + "paligemma.vision_tower.", PWE + "paligemma.model.vision_tower."),
    (PWE + "paligemma.multi_modal_projector.", PWE + "paligemma.model.multi_modal_projector."),
)
# tensors present in some files that carry no model weights we use
_IGNORED = re.compile(r"^(normalize_inputs|normalize_targets|unnormalize_outputs)\.|" + re.escape(EXPERT_LM_HEAD) + "$")

_TOP_LEVEL = ("state_proj", "action_in_proj", "action_out_proj", "action_time_mlp_in", "action_time_mlp_out",
              "time_mlp_in", "time_mlp_out")  # fmt: skip


def hf_key(ours: str) -> str:
    """Our parameter name -> openpi-PyTorch name (no `model.` prefix)."""
    rules = (
        (r"vision\.patch_embed\.(\w+)", VISION + r"embeddings.patch_embedding.\1"),
        (r"vision\.pos_embed", VISION + "embeddings.position_embedding.weight"),
        (r"vision\.blocks\.(\d+)\.norm1\.(\w+)", VISION + r"encoder.layers.\1.layer_norm1.\2"),
        (r"vision\.blocks\.(\d+)\.norm2\.(\w+)", VISION + r"encoder.layers.\1.layer_norm2.\2"),
        (r"vision\.blocks\.(\d+)\.attn\.(\w+)\.(\w+)", VISION + r"encoder.layers.\1.self_attn.\2.\3"),
        (r"vision\.blocks\.(\d+)\.mlp\.(\w+)\.(\w+)", VISION + r"encoder.layers.\1.mlp.\2.\3"),
        (r"vision\.norm\.(\w+)", VISION + r"post_layernorm.\1"),
        (r"vision\.head\.(\w+)", PROJECTOR + r"\1"),
        (r"llm\.embed_tokens\.weight", LM + "embed_tokens.weight"),
        (r"llm\.layers\.(\d+)\.experts\.(\d)\.(q|k|v|o)_proj\.weight", r"{E}layers.\1.self_attn.\3_proj.weight"),
        (r"llm\.layers\.(\d+)\.experts\.(\d)\.mlp\.(\w+)\.weight", r"{E}layers.\1.mlp.\3.weight"),
        (r"llm\.layers\.(\d+)\.experts\.(\d)\.attn_norm\.(.+)", r"{E}layers.\1.input_layernorm.\3"),
        (r"llm\.layers\.(\d+)\.experts\.(\d)\.ffn_norm\.(.+)", r"{E}layers.\1.post_attention_layernorm.\3"),
        (r"llm\.norms\.(\d)\.(.+)", r"{E}norm.\2"),
        (r"(" + "|".join(_TOP_LEVEL) + r")\.(\w+)", r"\1.\2"),
    )
    for pattern, repl in rules:
        m = re.fullmatch(pattern, ours)
        if m:
            out = m.expand(repl)
            if "{E}" in out:
                expert = m.group(2) if ours.startswith("llm.layers") else m.group(1)
                out = out.replace("{E}", LM if expert == "0" else EXPERT)
            return out
    raise ConversionError(f"no LeRobot name for parameter {ours!r}")


def normalize_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the LeRobot `model.` prefix, move the old layout to the current one, drop non-weight buffers."""
    out = {}
    for key, value in state.items():
        k = key.removeprefix("model.")
        for old, new in _OLD_TO_NEW:
            if k.startswith(old):
                k = new + k[len(old) :]
                break
        if _IGNORED.search(k):
            continue
        out[k] = value
    if LM + "embed_tokens.weight" not in out and LM_HEAD in out:
        out[LM + "embed_tokens.weight"] = out[LM_HEAD]  # tied: the saved file kept only lm_head
    out.pop(LM_HEAD, None)
    return out


def _count_layers(state: dict[str, Any], prefix: str, probe: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\." + re.escape(probe) + "$")
    idx = [int(m.group(1)) for k in state if (m := pat.match(k))]
    if not idx:
        raise ConversionError(f"no layers found under {prefix!r}; not an openpi-PyTorch / LeRobot PI0 checkpoint")
    return max(idx) + 1


def _gemma(state, prefix: str, head_dim: int, variant: GemmaConfig | None) -> GemmaConfig:
    q = state[prefix + "layers.0.self_attn.q_proj.weight"]
    k = state[prefix + "layers.0.self_attn.k_proj.weight"]
    if variant is not None:
        head_dim = variant.head_dim
    if q.shape[0] % head_dim or k.shape[0] % head_dim:
        raise ConversionError(
            f"q_proj {tuple(q.shape)} / k_proj {tuple(k.shape)} are not multiples of head_dim {head_dim}; "
            "pass --head-dim"
        )
    return GemmaConfig(
        width=q.shape[1],
        depth=_count_layers(state, prefix + "layers.", "self_attn.q_proj.weight"),
        mlp_dim=state[prefix + "layers.0.mlp.gate_proj.weight"].shape[0],
        num_heads=q.shape[0] // head_dim,
        num_kv_heads=k.shape[0] // head_dim,
        head_dim=head_dim,
    )


def infer_config(
    state: dict[str, torch.Tensor],
    hints: dict[str, Any] | None = None,
    head_dim: int | None = None,
    vision_heads: int | None = None,
    **overrides: Any,
) -> PI0Config:
    """Config from normalised HF-style weights plus the source's config.json (`hints`)."""
    hints = hints or {}
    if "pi0_lightning" in hints:  # written by export-lerobot: exact
        cfg = PI0Config.from_dict(hints["pi0_lightning"])
        return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    required = (VISION + "embeddings.patch_embedding.weight", LM + "layers.0.self_attn.q_proj.weight",
                EXPERT + "layers.0.self_attn.q_proj.weight", "action_in_proj.weight")  # fmt: skip
    missing = [k for k in required if k not in state]
    if missing:
        raise ConversionError(f"not a PI0 / PI0.5 checkpoint: missing {', '.join(missing)}")
    patch = state[VISION + "embeddings.patch_embedding.weight"]
    width = patch.shape[0]
    heads = vision_heads or (16 if width == 1152 else None)
    if heads is None:
        raise ConversionError(f"cannot infer SigLIP head count for width {width}; pass --vision-heads")
    num_patches = state[VISION + "embeddings.position_embedding.weight"].shape[0]
    vision = SiglipConfig(
        width=width,
        depth=_count_layers(state, VISION + "encoder.layers.", "layer_norm1.weight"),
        mlp_dim=state[VISION + "encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_heads=heads,
        patch_size=patch.shape[2],
        image_size=int(num_patches**0.5) * patch.shape[2],
    )
    pg_variant = GEMMA_VARIANTS.get(hints.get("paligemma_variant", ""))
    ae_variant = GEMMA_VARIANTS.get(hints.get("action_expert_variant", ""))
    hd = head_dim or 256
    pi05 = EXPERT + "layers.0.input_layernorm.dense.weight" in state
    cfg: dict[str, Any] = {
        "pi05": pi05,
        "vision": vision,
        "paligemma": _gemma(state, LM, hd, None if head_dim else pg_variant),
        "action_expert": _gemma(state, EXPERT, hd, None if head_dim else ae_variant),
        "vocab_size": state[LM + "embed_tokens.weight"].shape[0],
        "action_dim": state["action_in_proj.weight"].shape[1],
        "action_horizon": hints.get("chunk_size", hints.get("action_horizon", 50)),
        "max_token_len": hints.get("tokenizer_max_length", 200 if pi05 else 48),
    }
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return PI0Config(**cfg)


def lerobot_to_state_dict(
    state: dict[str, torch.Tensor], config: PI0Config, our_keys: list[str]
) -> dict[str, torch.Tensor]:
    """Pick every one of `our_keys` from the normalised HF-style dict; leftovers are an error."""
    if not config.pi05:  # some pi0 files name the action-time MLP like pi05's time MLP
        for side in ("in", "out"):
            if f"time_mlp_{side}.weight" in state and f"action_time_mlp_{side}.weight" not in state:
                for p in ("weight", "bias"):
                    state[f"action_time_mlp_{side}.{p}"] = state.pop(f"time_mlp_{side}.{p}")
    out = {}
    missing = []
    for key in our_keys:
        src = hf_key(key)
        if src not in state:
            missing.append(src)
            continue
        t = state[src]
        out[key] = t[None] if key == "vision.pos_embed" else t
    if missing:
        more = f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
        raise ConversionError(
            f"LeRobot checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:10])}{more}"
        )
    leftover = sorted(set(state) - {hf_key(k) for k in our_keys})
    if leftover:
        more = f" (+{len(leftover) - 10} more)" if len(leftover) > 10 else ""
        raise ConversionError(f"unknown tensor(s) in LeRobot checkpoint: {', '.join(leftover[:10])}{more}")
    return out


def fold_cfg_condition(state: dict[str, torch.Tensor], config: PI0Config) -> tuple[dict[str, torch.Tensor], PI0Config]:
    """Our state dict and config without `cfg_embed`, its positive row added to the bias of the action-token path's
    last linear layer (PI0: `action_time_mlp_out`; PI0.5: `action_in_proj`); unchanged without a CFG embedding.

    LeRobot's PI0 has no condition embedding. The model adds the condition's row, a constant, to every action token
    right after that layer, so the folded weights compute the positive-conditioned policy exactly: guidance w = 1,
    the rollout policy of RIPT-CFG. Guidance w > 1 extrapolates between the null and positive branches' velocities,
    two passes through the whole network, which no single set of weights without the embedding reproduces.
    """
    if "cfg_embed.weight" not in state:
        return state, config
    bias = "action_in_proj.bias" if config.pi05 else "action_time_mlp_out.bias"
    out = {k: v for k, v in state.items() if k != "cfg_embed.weight"}
    # a new tensor: state_dict() shares storage with the model, which must keep computing what it did
    out[bias] = state[bias] + state["cfg_embed.weight"][COND_POSITIVE].to(state[bias].dtype)
    return out, dataclasses.replace(config, num_cfg_conditions=0)


def state_dict_to_lerobot(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> current LeRobot layout (`model.` prefix; the embedding saved as `lm_head.weight`, as the hub files)."""
    out = {}
    for key, t in state.items():
        name = hf_key(key)
        if key == "vision.pos_embed":
            t = t[0]
        if key == "llm.embed_tokens.weight":
            name = LM_HEAD
        out["model." + name] = t.contiguous()
    return out


def lerobot_config(config: PI0Config) -> dict[str, Any]:
    """A LeRobot-style config.json, plus our exact config so a round trip needs no guessing."""

    def variant(g: GemmaConfig) -> str:
        return next((name for name, v in GEMMA_VARIANTS.items() if v == g), "custom")

    return {
        "type": "pi05" if config.pi05 else "pi0",
        "paligemma_variant": variant(config.paligemma),
        "action_expert_variant": variant(config.action_expert),
        "chunk_size": config.action_horizon,
        "n_action_steps": config.action_horizon,
        "max_state_dim": config.action_dim,
        "max_action_dim": config.action_dim,
        "tokenizer_max_length": config.max_token_len,
        "num_inference_steps": 10,
        "pi0_lightning": config.to_dict(),
    }
