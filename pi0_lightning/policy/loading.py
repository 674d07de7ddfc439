"""A LIBERO policy from a converted checkpoint directory, whichever model it holds (PI0, PI0.5 or PI0-FAST).

A directory written by `pi0-convert` or by RL export holds `config.json` (with `model_type`), the safetensors
weights, `norm_stats.json`, the PaliGemma tokenizer and, for PI0-FAST, the FAST processor in `fast_tokenizer/`.
Missing assets can be given explicitly; anything still missing is one clear `FileNotFoundError`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pi0_lightning.checkpoint import load_pretrained
from pi0_lightning.model.pi0_fast import PI0FAST
from pi0_lightning.policy.libero import LiberoPolicy
from pi0_lightning.policy.libero_fast import FAST_TOKENIZER_DIR, LiberoFASTPolicy
from pi0_lightning.policy.tokenizer import find_tokenizer_file


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
    path = Path(path)
    model = load_pretrained(path, dtype=dtype, device=device)
    tok_file = Path(tokenizer) if tokenizer else find_tokenizer_file(path)
    if tok_file is None:
        raise FileNotFoundError(
            f"{path} bundles no PaliGemma tokenizer; pass one (paligemma_tokenizer.model or tokenizer.model)"
        )
    norm_stats = path / "norm_stats.json"
    if not norm_stats.is_file():
        raise FileNotFoundError(f"{path} has no norm_stats.json (convert the checkpoint with its assets)")
    if isinstance(model, PI0FAST):
        fast_dir = Path(fast_tokenizer) if fast_tokenizer else path / FAST_TOKENIZER_DIR
        if not fast_dir.is_dir():
            raise FileNotFoundError(
                f"{path} bundles no FAST processor ({FAST_TOKENIZER_DIR}/); pass a local copy of it "
                "(processor_config.json + tokenizer.json)"
            )
        return LiberoFASTPolicy.build(
            model,
            norm_stats,
            tok_file,
            fast_dir,
            delta_actions=True if delta_actions is None else delta_actions,
            temperature=temperature,
            max_decoding_steps=max_decoding_steps,
            device=device,
            cuda_graphs=cuda_graphs,
        )
    return LiberoPolicy.build(
        model,
        norm_stats,
        tok_file,
        delta_actions,
        norm_mode,
        num_steps=num_steps,
        device=device,
        cuda_graphs=cuda_graphs,
    )
