"""A LIBERO policy from a converted checkpoint directory, whichever model it holds (PI0, PI0.5 or PI0-FAST), and
the assets a policy needs besides its weights.

A directory written by `pi0-convert` or by RL export holds `config.json` (with `model_type`), the safetensors
weights, `norm_stats.json`, the PaliGemma tokenizer and, for PI0-FAST, the FAST processor in `fast_tokenizer/`.
Missing assets can be given explicitly; anything still missing is one clear `FileNotFoundError`. A randomly
initialised model (demos, tests, learning proofs) gets a small tokenizer trained on its instructions, a FAST
processor fitted on synthetic chunks and the environment's norm stats (`resolve_assets`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pi0_lightning.checkpoint import load_pretrained, recorded_delta_actions
from pi0_lightning.model.pi0 import PI0
from pi0_lightning.model.pi0_fast import PI0FAST
from pi0_lightning.model.speed import SpeedConfig
from pi0_lightning.policy.assets import small_prompt_tokenizer, synthetic_fast_tokenizer
from pi0_lightning.policy.fast_tokenizer import FASTActionTokenizer
from pi0_lightning.policy.pi0_fast_libero import FAST_TOKENIZER_DIR, LiberoFASTPolicy
from pi0_lightning.policy.pi0_libero import LiberoPolicy
from pi0_lightning.policy.tokenizer import find_tokenizer_file
from pi0_lightning.policy.transforms import Normalizer


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


@dataclass
class PolicyAssets:
    """Everything besides the weights that turns a model into a LIBERO policy (and travels with its checkpoints)."""

    tokenizer: Path
    norm_stats: dict
    delta_actions: bool
    """openpi's delta-action transform (pi0 / PI0-FAST LIBERO checkpoints: yes; pi05: no)."""
    fast_tokenizer: FASTActionTokenizer | None = None

    def to_checkpoint(self) -> dict[str, Any]:
        """The assets as bytes for a Lightning checkpoint (a random model's tokenizer lives in a temporary file)."""
        fast = None
        if self.fast_tokenizer is not None:
            with tempfile.TemporaryDirectory() as tmp:
                saved = self.fast_tokenizer.save_pretrained(Path(tmp) / FAST_TOKENIZER_DIR)
                fast = {f.name: f.read_bytes() for f in saved.iterdir()}
        return {
            "tokenizer_name": self.tokenizer.name,
            "tokenizer_bytes": self.tokenizer.read_bytes(),
            "norm_stats": self.norm_stats,
            "delta_actions": self.delta_actions,
            "fast_tokenizer": fast,
        }

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any], delta_actions: bool) -> PolicyAssets:
        path = Path(tempfile.mkdtemp(prefix="pi0_tok_")) / saved["tokenizer_name"]
        path.write_bytes(saved["tokenizer_bytes"])
        fast = None
        if saved.get("fast_tokenizer"):
            fast_dir = path.parent / FAST_TOKENIZER_DIR
            fast_dir.mkdir()
            for name, data in saved["fast_tokenizer"].items():
                (fast_dir / name).write_bytes(data)
            fast = FASTActionTokenizer.from_pretrained(fast_dir)
        return cls(path, saved["norm_stats"], saved.get("delta_actions", delta_actions), fast)


def resolve_assets(
    model: PI0 | PI0FAST,
    checkpoint: str | Path | None,
    tokenizer: str | Path | None = None,
    fast_tokenizer: str | Path | None = None,
    delta_actions: bool | None = None,
    instructions: Sequence[str] = (),
    env_norm_stats: dict | None = None,
    env_delta_actions: bool = False,
    seed: int = 0,
    data_norm_stats: dict | None = None,
    data_chunks: Callable[[int, bool], np.ndarray] | None = None,
) -> PolicyAssets:
    """Each asset explicit if given, else the checkpoint's, else (random models) built for the environment: a small
    tokenizer trained on its `instructions`, a FAST processor fitted on synthetic chunks, its norm stats.
    `data_norm_stats` (a demonstration dataset's, for supervised fine-tuning) come before the checkpoint's, as openpi
    normalises with the stats of the data it trains on. A random PI0-FAST without a FAST processor gets one fitted
    on `data_chunks(horizon, delta_actions)` (a demonstration dataset's chunks) if given, else on synthetic chunks."""
    fast = isinstance(model, PI0FAST)
    bundled = None
    if checkpoint is not None:
        bundled = checkpoint_assets(checkpoint, fast, tokenizer, fast_tokenizer, require_norm_stats=False)
    tok = bundled.tokenizer if bundled else tokenizer
    if tok is None:
        tmp = Path(tempfile.mkdtemp(prefix="pi0_tok_"))
        vocab = min(1000, model.config.vocab_size)
        tok = small_prompt_tokenizer(instructions, tmp / "small_tokenizer.model", vocab, fast=fast)
    if data_norm_stats is not None:
        norm_stats = data_norm_stats
    elif bundled is not None and bundled.norm_stats is not None:
        norm_stats = json.loads(bundled.norm_stats.read_text())
    elif env_norm_stats is not None:
        norm_stats = env_norm_stats
    else:
        raise FileNotFoundError("no norm stats: the checkpoint has no norm_stats.json and no environment gives any")
    if delta_actions is None and checkpoint is not None:
        delta_actions = recorded_delta_actions(checkpoint)
    if delta_actions is None:
        # converted LIBERO checkpoints follow openpi (pi0 and PI0-FAST delta, pi05 absolute); random ones the env's
        delta_actions = (fast or not model.config.pi05) if checkpoint is not None else env_delta_actions
    fast_tok = None
    if fast:
        fast_dir = bundled.fast_tokenizer if bundled else fast_tokenizer
        horizon, dim = model.config.action_horizon, model.config.action_dim
        if fast_dir is not None:
            fast_tok = FASTActionTokenizer.from_pretrained(fast_dir)
        elif data_chunks is not None:  # PI0-FAST normalises with quantiles
            normalizer = Normalizer.from_json(norm_stats, mode="quantile")
            chunks = normalizer.normalize_actions(data_chunks(horizon, delta_actions))[..., :dim]
            fast_tok = FASTActionTokenizer.fit(chunks, vocab_size=256)
        else:
            fast_tok = synthetic_fast_tokenizer(horizon, dim, seed=seed)
    return PolicyAssets(Path(tok), norm_stats, delta_actions, fast_tok)


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
    speed: SpeedConfig | None = None,
) -> LiberoPolicy | LiberoFASTPolicy:
    """`num_steps` (Euler steps) applies to PI0 / PI0.5, `temperature` and `max_decoding_steps` to PI0-FAST
    (openpi: greedy, 256); `speed` installs speed paths on the model (e.g. CUDA graphs on a GPU)."""
    model = load_pretrained(path, dtype=dtype, device=device)
    assets = checkpoint_assets(path, isinstance(model, PI0FAST), tokenizer, fast_tokenizer)
    if delta_actions is None:
        delta_actions = recorded_delta_actions(path)  # None: openpi's default for the model type
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
            speed=speed,
        )
    return LiberoPolicy.build(
        model,
        assets.norm_stats,
        assets.tokenizer,
        delta_actions,
        norm_mode,
        num_steps=num_steps,
        device=device,
        speed=speed,
    )
