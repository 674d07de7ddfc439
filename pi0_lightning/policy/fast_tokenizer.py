"""FAST action tokenizer (Pertsch et al., "FAST: Efficient Action Tokenization"; Physical Intelligence's processor).

Encode an action chunk (T, D), already normalised (openpi: quantile normalisation to about [-1, 1]):
  1. orthonormal DCT-II along time, per action dimension;
  2. multiply by `scale` and round to integers (the only lossy step: each coefficient moves by at most 1/(2 scale),
     so with an orthonormal transform the chunk's L2 error is at most sqrt(T * D) / (2 scale));
  3. shift by -`min_token` so every coefficient is a non-negative integer, and write the (T, D) coefficients
     row-major (time-frequency major) as one character each (`chr`), clamping below at 0;
  4. byte-pair encode that string (`tokenizers` BPE over those characters): FAST ids 0 .. vocab_size-1.
Decoding inverts 4-1; a decoded sequence of the wrong length gives zeros and a warning (openpi's behaviour).
In PI0-FAST prompts a FAST id k is written as PaliGemma id 257023 - k (the last 128 ids are skipped).

`FASTActionTokenizer.from_pretrained(dir)` reads a local copy of the published processor (`processor_config.json`
with scale / min_token / vocab_size, and the BPE `tokenizer.json`); `FASTActionTokenizer.fit(chunks)` trains a new
BPE on action chunks. Deliberate simplification: the fitted BPE has no pre-tokenizer (merges may span the whole
sequence); the published processor's exact training settings are not reproduced, only its encode/decode contract.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

PALIGEMMA_FAST_OFFSET = 257_152 - 1 - 128  # PaliGemma id = 257023 - FAST id


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix C (n, n): coefficients = C @ x, inverse x = C.T @ coefficients."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    c = np.sqrt(2.0 / n) * np.cos(np.pi * (i + 0.5) * k / n)
    c[0] /= np.sqrt(2.0)
    return c


def fast_to_paligemma(ids: np.ndarray | list[int], offset: int = PALIGEMMA_FAST_OFFSET) -> np.ndarray:
    """PaliGemma ids of FAST ids (offset - k); the mapping is its own inverse."""
    return offset - np.asarray(ids, dtype=np.int64)


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(
            f"the FAST action tokenizer needs the `tokenizers` package ({e}): pip install tokenizers"
        ) from None
    return tokenizers


class FASTActionTokenizer:
    def __init__(self, bpe, scale: float = 10.0, min_token: int = -354, vocab_size: int = 2048):
        self.bpe = bpe
        self.scale = float(scale)
        self.min_token = int(min_token)
        self.vocab_size = int(vocab_size)

    # -------------------------------------------------------------- encode / decode

    def coefficients(self, chunk: np.ndarray) -> np.ndarray:
        """Quantised DCT coefficients (T, D) of a chunk (T, D)."""
        chunk = np.asarray(chunk, dtype=np.float64)
        if chunk.ndim != 2:
            raise ValueError(f"an action chunk must be (T, D), got shape {chunk.shape}")
        return np.round(dct_matrix(chunk.shape[0]) @ chunk * self.scale).astype(np.int64)

    def _text(self, chunk: np.ndarray) -> str:
        shifted = np.maximum(self.coefficients(chunk) - self.min_token, 0)
        return "".join(chr(int(c)) for c in shifted.reshape(-1))

    def encode(self, chunk: np.ndarray) -> list[int]:
        """FAST ids of one chunk (T, D)."""
        return self.bpe.encode(self._text(chunk)).ids

    def try_decode(self, ids: list[int] | np.ndarray, time_horizon: int, action_dim: int) -> np.ndarray | None:
        """A (time_horizon, action_dim) chunk, or None if the ids do not decode to that shape."""
        ids = [int(i) for i in ids]
        if self.bpe.decoder is not None:  # e.g. a byte-level BPE: let its decoder undo the byte mapping
            text = self.bpe.decode(ids)
        else:  # a plain BPE over the coefficient characters: tokens concatenate (decode() would insert spaces)
            text = "".join(self.bpe.id_to_token(i) or "" for i in ids)
        coeff = np.array([ord(ch) + self.min_token for ch in text], dtype=np.float64)
        if coeff.size != time_horizon * action_dim:
            return None
        return dct_matrix(time_horizon).T @ (coeff.reshape(time_horizon, action_dim) / self.scale)

    def decode(self, ids: list[int] | np.ndarray, time_horizon: int, action_dim: int) -> np.ndarray:
        """A (time_horizon, action_dim) chunk; zeros (with a warning) if the ids do not decode to that shape."""
        chunk = self.try_decode(ids, time_horizon, action_dim)
        if chunk is None:
            logger.warning(
                "FAST tokens do not decode to %d x %d coefficients; returning zeros", time_horizon, action_dim
            )
            return np.zeros((time_horizon, action_dim))
        return chunk

    # -------------------------------------------------------------- building

    @classmethod
    def fit(
        cls,
        chunks: np.ndarray,
        scale: float = 10.0,
        vocab_size: int = 2048,
        min_token: int | None = None,
    ) -> FASTActionTokenizer:
        """Train a BPE on action chunks (N, T, D); `min_token` defaults to the smallest quantised coefficient."""
        tk = _tokenizers()
        chunks = np.asarray(chunks, dtype=np.float64)
        probe = cls(None, scale, 0, vocab_size)
        coeffs = np.stack([probe.coefficients(c) for c in chunks])
        lo = int(coeffs.min()) if min_token is None else int(min_token)
        hi = int(coeffs.max())
        alphabet = [chr(i) for i in range(hi - lo + 1)]
        model = tk.models.BPE()
        bpe = tk.Tokenizer(model)
        trainer = tk.trainers.BpeTrainer(
            vocab_size=max(vocab_size, len(alphabet)),
            min_frequency=2,
            initial_alphabet=alphabet,
            show_progress=False,
            max_token_length=10_000,
        )
        self_ = cls(bpe, scale, lo, vocab_size)
        bpe.train_from_iterator((self_._text(c) for c in chunks), trainer=trainer)
        self_.vocab_size = bpe.get_vocab_size()
        return self_

    @classmethod
    def from_pretrained(cls, path: str | Path) -> FASTActionTokenizer:
        """A local copy of a FAST processor: `processor_config.json` and the BPE `tokenizer.json`."""
        path = Path(path)
        cfg_file, tok_file = path / "processor_config.json", path / "tokenizer.json"
        missing = [f.name for f in (cfg_file, tok_file) if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{path} is not a FAST processor directory (missing {', '.join(missing)})")
        cfg = json.loads(cfg_file.read_text())
        bpe = _tokenizers().Tokenizer.from_file(str(tok_file))
        return cls(bpe, cfg.get("scale", 10), cfg.get("min_token", -354), cfg.get("vocab_size", bpe.get_vocab_size()))

    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.bpe.save(str(path / "tokenizer.json"))
        config = {"scale": self.scale, "min_token": self.min_token, "vocab_size": self.vocab_size}
        (path / "processor_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return path
