"""Our checkpoint directory: `model.safetensors`, `config.json`, optional `norm_stats.json` and tokenizer file.

Writes go to a temporary sibling directory that is renamed into place, so an interrupted save leaves nothing
half-written. Loading validates keys and shapes against the config and reports problems in one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pi0_lightning.convert.errors import ConversionError
from pi0_lightning.convert.io import atomic_output_dir
from pi0_lightning.model.config import PI0Config
from pi0_lightning.model.pi0 import PI0
from pi0_lightning.model.pi0_fast import PI0FAST, PI0FASTConfig

FORMAT = "pi0_lightning"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
NORM_STATS = "norm_stats.json"


class CheckpointError(ConversionError):
    """A checkpoint directory that cannot be loaded (missing files, wrong keys or shapes)."""


def _list(names: list[str] | set[str], limit: int = 10) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_state_dict(expected: dict[str, torch.Size], got: dict[str, torch.Size], source: str) -> None:
    """Raise one clear error naming up to 10 missing, unexpected or mis-shaped tensors."""
    problems = []
    missing = set(expected) - set(got)
    unexpected = set(got) - set(expected)
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_list(unexpected)}")
    bad = [
        f"{k} {tuple(got[k])} != {tuple(expected[k])}"
        for k in sorted(set(expected) & set(got))
        if got[k] != expected[k]
    ]
    if bad:
        problems.append(f"{len(bad)} shape mismatch(es): {_list(bad)}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def build_model(config: PI0Config | PI0FASTConfig, device: str | torch.device = "meta") -> PI0 | PI0FAST:
    """Construct the model without spending time on random init when weights will be loaded (meta device)."""
    with torch.device(device):
        return PI0FAST(config) if isinstance(config, PI0FASTConfig) else PI0(config)


def save_pretrained(
    model: PI0,
    path: str | Path,
    norm_stats: dict[str, Any] | None = None,
    tokenizer_path: str | Path | None = None,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    asset_dirs: dict[str, str | Path] | None = None,
) -> Path:
    """Weights, config.json, norm stats, the tokenizer file and `asset_dirs` (name -> directory copied under that
    name, e.g. PI0-FAST's `fast_tokenizer`), written atomically."""
    path = Path(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_output_dir(path, overwrite=overwrite) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_type": "pi0_fast" if isinstance(model, PI0FAST) else "pi0",
            "model": model.config.to_dict(),
        }
        if metadata:
            config["metadata"] = metadata
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if norm_stats is not None:
            (tmp / NORM_STATS).write_text(json.dumps(norm_stats, indent=2) + "\n")
        if tokenizer_path is not None:
            name = Path(tokenizer_path).name
            if name not in ("tokenizer.model", "paligemma_tokenizer.model", "tokenizer.json"):
                # under a name the loaders look for (a small SentencePiece model trained for a random model)
                name = "tokenizer.json" if name.endswith(".json") else "tokenizer.model"
            shutil.copy2(tokenizer_path, tmp / name)
        for name, source in (asset_dirs or {}).items():
            shutil.copytree(source, tmp / name)
    return path


def read_config(path: str | Path) -> PI0Config | PI0FASTConfig:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    cfg_file = path / CONFIG
    if not path.is_dir() or not cfg_file.is_file() or not (path / WEIGHTS).is_file():
        raise CheckpointError(
            f"{path} is not a pi0_lightning checkpoint (expected {CONFIG} and {WEIGHTS}; "
            "convert openpi or LeRobot checkpoints with `pi0-convert`)"
        )
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from None
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_file} is not a pi0_lightning config (format={raw.get('format')!r})")
    try:
        if raw.get("model_type", "pi0") == "pi0_fast":
            return PI0FASTConfig(**raw["model"])
        return PI0Config.from_dict(raw["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: bad model config ({e})") from None


def load_state_dict_file(file: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{file}: cannot read safetensors ({e})") from None


def check_weights(path: str | Path) -> None:
    """Check a checkpoint directory's weights against its config.json from the safetensors header alone (names and
    shapes; a truncated or garbled file fails here), without reading tensors: cheap enough to run before a run
    creates anything."""
    path = Path(path)
    config = read_config(path)
    file = path / WEIGHTS
    try:
        with safe_open(str(file), framework="pt") as f:
            got = {k: torch.Size(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{file}: cannot read safetensors ({e})") from None
    check_state_dict({k: v.shape for k, v in build_model(config).state_dict().items()}, got, str(path))


def load_pretrained(path: str | Path, dtype: str | None = None, device: str | torch.device = "cpu") -> PI0 | PI0FAST:
    path = Path(path)
    config = read_config(path)
    state = load_state_dict_file(path / WEIGHTS)
    model = build_model(config)
    check_state_dict(
        {k: v.shape for k, v in model.state_dict().items()}, {k: v.shape for k, v in state.items()}, str(path)
    )
    model.load_state_dict(state, assign=True)
    model.apply_dtype_policy(dtype or config.dtype)
    return model.to(device).eval()


def recorded_delta_actions(path: str | Path) -> bool | None:
    """The delta-action setting an exported policy was trained with (config.json metadata), None if unrecorded
    (converted checkpoints follow openpi's convention instead)."""
    try:
        raw = json.loads((Path(path) / CONFIG).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    value = (raw.get("metadata") or {}).get("policy", {}).get("delta_actions")
    return bool(value) if value is not None else None


def read_norm_stats(path: str | Path) -> dict[str, Any] | None:
    file = Path(path) / NORM_STATS
    return json.loads(file.read_text()) if file.is_file() else None


def is_fast(checkpoint: str | Path | None, variant: str) -> bool:
    """Whether a checkpoint directory (or, without one, a named variant) holds PI0-FAST."""
    if checkpoint:
        return isinstance(read_config(checkpoint), PI0FASTConfig)
    from pi0_lightning.model.pi0_fast import FAST_VARIANTS

    return variant in FAST_VARIANTS


def load_or_init(
    checkpoint: str | Path | None, variant: str, action_horizon: int | None = None, seed: int = 0
) -> PI0 | PI0FAST:
    """The checkpoint's model in float32, or a randomly initialised `variant` (seeded) when there is none;
    `action_horizon` overrides the horizon H (must cover the chunks executed between replans)."""
    if checkpoint:
        model = load_pretrained(checkpoint, dtype="float32")
        if action_horizon:
            model.config.action_horizon = action_horizon
        return model
    overrides = {"action_horizon": action_horizon} if action_horizon else {}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if is_fast(None, variant):
            return PI0FAST(PI0FASTConfig.variant(variant, **overrides))
        return PI0(PI0Config.variant(variant, **overrides))


def export_pretrained(
    model: PI0 | PI0FAST,
    path: str | Path,
    norm_stats: dict | None,
    tokenizer_path: str | Path | None,
    fast_tokenizer: Any = None,
    lora: tuple[int, float] | None = None,
    delta_actions: bool | None = None,
) -> Path:
    """A trained model as a checkpoint directory (float32 safetensors, LoRA merged, assets bundled), loadable by
    `PI0.from_pretrained` / `load_policy`. Reads parameters by name, so it also works on FSDP-wrapped models inside
    a full-parameter context; `lora` is the (rank, alpha) the model was trained with; `delta_actions` (the action
    transform it was trained with) is recorded in config.json so that loaders use the same."""
    import dataclasses
    import tempfile

    from pi0_lightning.model.lora import apply_lora, merge_lora

    def clean(name: str) -> str:  # FSDP / activation-checkpoint wrappers insert these into parameter names
        return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")

    state = {clean(n): p.detach().to("cpu", torch.float32) for n, p in model.named_parameters()}
    out = build_model(dataclasses.replace(model.config, dtype="float32"))
    if lora is not None:
        apply_lora(out.llm, *lora)
    out.load_state_dict(state, assign=True)
    merge_lora(out)
    out.apply_dtype_policy("float32")
    with tempfile.TemporaryDirectory() as tmp:
        assets = {}
        if fast_tokenizer is not None:
            from pi0_lightning.policy.pi0_fast_libero import FAST_TOKENIZER_DIR

            assets[FAST_TOKENIZER_DIR] = fast_tokenizer.save_pretrained(Path(tmp) / FAST_TOKENIZER_DIR)
        metadata = {"policy": {"delta_actions": delta_actions}} if delta_actions is not None else None
        out.save_pretrained(
            path,
            norm_stats=norm_stats,
            tokenizer_path=tokenizer_path,
            overwrite=True,
            asset_dirs=assets,
            metadata=metadata,
        )
    return Path(path)
