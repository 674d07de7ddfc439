"""A LIBERO policy from a converted checkpoint directory, whichever model it holds (PI0, PI0.5 or PI0-FAST).

A directory written by `pi0-convert` or by RL export holds `config.json` (with `model_type`), the safetensors
weights, `norm_stats.json`, the PaliGemma tokenizer and, for PI0-FAST, the FAST processor in `fast_tokenizer/`.
Missing assets can be given explicitly; anything still missing is one clear `FileNotFoundError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pi0_lightning.checkpoint import load_pretrained
from pi0_lightning.model.pi0_fast import PI0FAST
from pi0_lightning.policy.libero import LiberoPolicy
from pi0_lightning.policy.libero_fast import FAST_TOKENIZER_DIR, LiberoFASTPolicy
from pi0_lightning.policy.tokenizer import find_tokenizer_file


@dataclass
class CheckpointAssets:
    """What a checkpoint directory needs besides its weights."""

    tokenizer: Path
    norm_stats: Path | None
    fast_tokenizer: Path | None
    """The FAST processor directory (PI0-FAST only)."""


def checkpoint_assets(
    path: str | Path,
    fast: bool,
    tokenizer: str | Path | None = None,
    fast_tokenizer: str | Path | None = None,
    require_norm_stats: bool = True,
) -> CheckpointAssets:
    """The checkpoint's bundled assets, or the explicitly given ones; a missing one is a FileNotFoundError naming it
    (the CLIs turn it into their one-line error before anything is written)."""
    path = Path(path)
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise FileNotFoundError(f"tokenizer file {tokenizer} does not exist")
    tok_file = Path(tokenizer) if tokenizer else find_tokenizer_file(path)
    if tok_file is None:
        raise FileNotFoundError(
            f"{path} bundles no PaliGemma tokenizer; pass one (paligemma_tokenizer.model or tokenizer.model) with "
            "model.tokenizer / --tokenizer"
        )
    norm_stats = path / "norm_stats.json"
    if not norm_stats.is_file():
        if require_norm_stats:
            raise FileNotFoundError(f"{path} has no norm_stats.json (convert the checkpoint with its assets)")
        norm_stats = None
    fast_dir = None
    if fast:
        fast_dir = Path(fast_tokenizer) if fast_tokenizer else path / FAST_TOKENIZER_DIR
        if not fast_dir.is_dir():
            raise FileNotFoundError(
                f"{path} bundles no FAST processor ({FAST_TOKENIZER_DIR}/); pass a local copy of it "
                "(processor_config.json + tokenizer.json) with model.fast_tokenizer / --fast-tokenizer"
                if not fast_tokenizer
                else f"FAST processor directory {fast_tokenizer} does not exist"
            )
    return CheckpointAssets(tok_file, norm_stats, fast_dir)


def load_policy(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | None = None,
    tokenizer: str | Path | None = None,
    fast_tokenizer: str | Path | None = None,
    delta_actions: bool | None = None,
    norm_mode: str | None = None,
    num_steps: int = 10,
    temperature: float = 0.0,
    max_decoding_steps: int = 256,
    cuda_graphs: bool = False,
) -> LiberoPolicy | LiberoFASTPolicy:
    """`num_steps` (Euler steps) applies to PI0 / PI0.5, `temperature` and `max_decoding_steps` to PI0-FAST
    (openpi: greedy, 256); `cuda_graphs` replays sampling as CUDA graphs on a GPU."""
    model = load_pretrained(path, dtype=dtype, device=device)
    assets = checkpoint_assets(path, isinstance(model, PI0FAST), tokenizer, fast_tokenizer)
    if isinstance(model, PI0FAST):
        return LiberoFASTPolicy.build(
            model,
            assets.norm_stats,
            assets.tokenizer,
            assets.fast_tokenizer,
            delta_actions=True if delta_actions is None else delta_actions,
            temperature=temperature,
            max_decoding_steps=max_decoding_steps,
            device=device,
            cuda_graphs=cuda_graphs,
        )
    return LiberoPolicy.build(
        model,
        assets.norm_stats,
        assets.tokenizer,
        delta_actions,
        norm_mode,
        num_steps=num_steps,
        device=device,
        cuda_graphs=cuda_graphs,
    )
