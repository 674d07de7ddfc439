"""Policy assets for randomly initialised models (tests, demos, the CPU learning proofs), built on the fly.

Real checkpoints bring the PaliGemma tokenizer, norm stats and (PI0-FAST) the FAST processor; a tiny random model
has none, and its embedding is far smaller than PaliGemma's 257152 rows. These builders give it a small
SentencePiece model trained on the prompts it will see and, for PI0-FAST, a FAST BPE fitted on smooth synthetic
chunks (or on real ones, when the caller has them).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pi0_lightning.policy.fast_tokenizer import FASTActionTokenizer, dct_matrix
from pi0_lightning.policy.tokenizer import ACTION_CUE, ACTION_END, STATE_BINS, train_small_tokenizer


def small_prompt_tokenizer(instructions: Sequence[str], path: str | Path, vocab_size: int, fast: bool = False) -> Path:
    """A small SentencePiece model for `instructions`; with `fast`, trained on PI0-FAST prompts (lower-cased
    instruction, state bins, the action cue and end marker) so those split into few pieces."""
    texts = list(instructions) or ["do the task"]
    if fast:
        bins = " ".join(str(i) for i in range(STATE_BINS))
        texts = [f"Task: {t.lower()}, State: {bins};\n{ACTION_CUE}{ACTION_END}" for t in texts]
    return train_small_tokenizer(texts, path, vocab_size=vocab_size)


def smooth_chunks(n: int, horizon: int, dim: int, seed: int = 0) -> np.ndarray:
    """(n, horizon, dim) random smooth trajectories in [-1, 1]: DCT coefficients with variance falling as 1/k^2."""
    rng = np.random.default_rng(seed)
    coeff = rng.normal(size=(n, horizon, dim)) * (0.8 / (1.0 + np.arange(horizon)))[None, :, None]
    return np.clip(np.einsum("kt,nkd->ntd", dct_matrix(horizon), coeff), -1.0, 1.0)


def synthetic_fast_tokenizer(horizon: int, dim: int, vocab_size: int = 256, seed: int = 0) -> FASTActionTokenizer:
    """A FAST BPE fitted on 2000 smooth synthetic chunks (for random models that have no processor)."""
    return FASTActionTokenizer.fit(smooth_chunks(2000, horizon, dim, seed), vocab_size=vocab_size)
