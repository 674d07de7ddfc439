"""PaliGemma prompt tokenization, token-for-token as openpi feeds its PI0 / PI0.5 models.

openpi (``src/openpi/models/tokenizer.py``, ``PaligemmaTokenizer.tokenize``) builds the language prefix like this:

* Tokenizer: the PaliGemma SentencePiece model ``paligemma_tokenizer.model`` (vocab 257152; pad 0, eos 1, bos 2).
  No lower-casing; the model itself does not normalise whitespace.
* Cleaning: ``clean = prompt.strip().replace("_", " ").replace("\\n", " ")``.
* PI0 (continuous state, no ``state`` given)::

      ids = sp.encode(clean, add_bos=True) + sp.encode("\\n")

  The trailing newline is encoded on its own and acts as the "start of answer" token.
* PI0.5 (discrete state, ``state`` given)::

      bins = np.digitize(state, bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1
      text = f"Task: {clean}, State: {' '.join(map(str, bins))};\\nAction: "
      ids  = sp.encode(text, add_bos=True)

  ``state`` is the *normalised* (roughly [-1, 1]) and *unpadded* robot state: in openpi's transform chain
  ``TokenizePrompt`` runs after ``Normalize`` and before ``PadStatesAndActions``. Values below -1 give bin -1 and
  values at or above 1 give bin 255, exactly as ``np.digitize`` does; openpi does not clip, so neither do we.
* Length: ``max_len`` is 48 for PI0 and 200 for PI0.5 (openpi's ``Pi0Config.max_token_len`` default). Longer
  sequences are cut to ``max_len``; shorter ones are right-padded with id 0. The mask is True on real tokens.

Deliberate differences from openpi, none of which change the ids:

* openpi logs the truncation warning on every call; we log it once per tokenizer (then at DEBUG level), since a
  data loader would otherwise repeat it for every sample.
* Besides SentencePiece ``.model`` files we accept a Hugging Face ``tokenizer.json`` through the optional
  ``tokenizers`` package. That path assumes the JSON describes the same PaliGemma vocabulary (as the HF PaliGemma
  repositories do); special tokens are added by us, never by the JSON's post-processor.

PI0-FAST prompts (state in the prefix, FAST action tokens in the postfix) are :class:`FASTPromptTokenizer`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import sentencepiece
import torch

logger = logging.getLogger(__name__)

PALIGEMMA_VOCAB_SIZE = 257152
PAD_ID = 0
PI0_MAX_LEN = 48
PI05_MAX_LEN = 200
STATE_BINS = 256

# Looked up in this order inside a directory; the SentencePiece files come first because they are what openpi
# itself loads, so ids are guaranteed identical.
TOKENIZER_FILE_NAMES = ("tokenizer.model", "paligemma_tokenizer.model", "tokenizer.json")
_LOOKED_FOR = ", ".join(TOKENIZER_FILE_NAMES)

# Piece names a Hugging Face tokenizer.json may use for BOS (Gemma uses "<bos>").
_BOS_PIECES = ("<bos>", "<s>")


def default_max_len(pi05: bool) -> int:
    """openpi's default ``max_token_len``: PI0.5 carries the state string in the prompt, so it needs more room."""
    return PI05_MAX_LEN if pi05 else PI0_MAX_LEN


def clean_prompt(prompt: str) -> str:
    """openpi's prompt cleaning: strip, then underscores and newlines become spaces (case is kept)."""
    return prompt.strip().replace("_", " ").replace("\n", " ")


def discretize_state(state: np.ndarray) -> np.ndarray:
    """Map a normalised state to openpi's 256 bins; out-of-range values are not clipped (-1 / 255 as digitize gives)."""
    edges = np.linspace(-1, 1, STATE_BINS + 1)[:-1]
    return np.digitize(state, bins=edges) - 1


def pi05_prompt_text(prompt: str, state: np.ndarray) -> str:
    """The PI0.5 prefix string: cleaned task, discretised state, then the ``Action:`` cue."""
    state_str = " ".join(map(str, discretize_state(state)))
    return f"Task: {clean_prompt(prompt)}, State: {state_str};\nAction: "


def find_tokenizer_file(directory: str | Path) -> Path | None:
    """First of :data:`TOKENIZER_FILE_NAMES` present in ``directory``, or None (also None if it is not a directory)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    for name in TOKENIZER_FILE_NAMES:
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


class TextEncoder(Protocol):
    """What :class:`PromptTokenizer` needs from a tokenizer library."""

    @property
    def bos_id(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without any special token."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...


class SentencePieceEncoder:
    """The reference backend: the same library and calls openpi uses."""

    def __init__(self, processor: sentencepiece.SentencePieceProcessor) -> None:
        self.processor = processor

    @property
    def bos_id(self) -> int:
        return int(self.processor.bos_id())

    @property
    def vocab_size(self) -> int:
        return int(self.processor.vocab_size())

    def encode(self, text: str) -> list[int]:
        return list(self.processor.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.processor.decode([int(i) for i in ids])


class HFTokenizersEncoder:
    """Fallback for directories that only ship ``tokenizer.json`` (needs the optional ``tokenizers`` package)."""

    def __init__(self, tokenizer: object, path: Path | str = "tokenizer.json") -> None:
        self.tokenizer = tokenizer
        bos_ids = [tokenizer.token_to_id(piece) for piece in _BOS_PIECES]
        bos = next((i for i in bos_ids if i is not None), None)
        if bos is None:
            raise ValueError(f"Tokenizer {path} has no BOS token (looked for {', '.join(_BOS_PIECES)})")
        self._bos_id = int(bos)

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: the JSON's post-processor would otherwise add a second BOS.
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def load_sentencepiece(path: Path) -> SentencePieceEncoder:
    """Load a SentencePiece model file; a file that is not one raises ValueError naming it."""
    try:
        # Reading bytes ourselves keeps error messages about *our* path and sidesteps non-ASCII path issues.
        processor = sentencepiece.SentencePieceProcessor(model_proto=path.read_bytes())
    except (RuntimeError, OSError) as exc:
        raise ValueError(f"Cannot read SentencePiece tokenizer {path}: {exc}".strip()) from exc
    # An empty proto parses without error but yields a useless, vocabulary-less processor.
    if processor.vocab_size() <= 0 or processor.bos_id() < 0:
        raise ValueError(f"Cannot read SentencePiece tokenizer {path}: empty model or no BOS token")
    return SentencePieceEncoder(processor)


def load_hf_tokenizer_json(path: Path) -> HFTokenizersEncoder:
    """Load a Hugging Face ``tokenizer.json``; ImportError if ``tokenizers`` is missing, ValueError if unreadable."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise ImportError(
            f"{path} is a Hugging Face tokenizer.json, which needs `pip install tokenizers`; "
            "alternatively point to a SentencePiece tokenizer.model / paligemma_tokenizer.model"
        ) from exc
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust binding raises a bare Exception on malformed JSON
        raise ValueError(f"Cannot read Hugging Face tokenizer {path}: {exc}") from exc
    return HFTokenizersEncoder(tokenizer, path)


def _resolve_tokenizer_file(path: Path) -> Path:
    if path.is_dir():
        found = find_tokenizer_file(path)
        if found is None:
            raise FileNotFoundError(f"No tokenizer file in directory {path} (looked for {_LOOKED_FOR})")
        return found
    if not path.is_file():
        raise FileNotFoundError(
            f"Tokenizer not found: {path} (expected a SentencePiece .model file or a directory with {_LOOKED_FOR})"
        )
    return path


def _as_text(prompt: str | bytes | np.ndarray) -> str:
    # Datasets hand prompts over as numpy string scalars or bytes as often as str (openpi calls .item()).
    if isinstance(prompt, np.ndarray):
        prompt = prompt.item()
    if isinstance(prompt, bytes):
        prompt = prompt.decode("utf-8")
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    return str(prompt)


def _as_state(state: np.ndarray | torch.Tensor | Sequence[float]) -> np.ndarray:
    if isinstance(state, torch.Tensor):
        state = state.detach().cpu()
        # numpy has no bfloat16; other dtypes are kept so bin edges see exactly the caller's values.
        state = (state.float() if state.dtype == torch.bfloat16 else state).numpy()
    state = np.asarray(state)
    # A 2-D array would be stringified row by row into a prompt the model never saw.
    if state.ndim != 1:
        raise ValueError(f"state must be 1-D (one sample), got shape {tuple(state.shape)}")
    return state


class PromptTokenizer:
    """Turns a task instruction (and, for PI0.5, the normalised state) into padded PaliGemma ids and a mask."""

    def __init__(
        self,
        processor: TextEncoder | sentencepiece.SentencePieceProcessor,
        max_len: int = PI0_MAX_LEN,
        path: Path | str | None = None,
    ) -> None:
        if max_len < 1:
            raise ValueError(f"max_len must be positive, got {max_len}")
        if isinstance(processor, sentencepiece.SentencePieceProcessor):
            processor = SentencePieceEncoder(processor)
        self.processor: TextEncoder = processor
        self.max_len = int(max_len)
        self.path: Path | None = Path(path) if path is not None else None
        self._warned_truncation = False

    @classmethod
    def from_file(cls, path: str | Path, max_len: int = PI0_MAX_LEN) -> PromptTokenizer:
        """Load from a ``.model`` / ``tokenizer.json`` file or a directory holding one (see TOKENIZER_FILE_NAMES)."""
        file = _resolve_tokenizer_file(Path(path).expanduser())
        processor = load_hf_tokenizer_json(file) if file.suffix == ".json" else load_sentencepiece(file)
        return cls(processor, max_len=max_len, path=file)

    @property
    def vocab_size(self) -> int:
        return self.processor.vocab_size

    def build_ids(self, prompt: str, state: np.ndarray | None = None) -> list[int]:
        """Unpadded ids in openpi's layout; override this to add another prompt format (e.g. PI0-FAST)."""
        bos = [self.processor.bos_id]
        if state is None:
            # PI0: the newline is encoded separately so it is always its own "start of answer" token.
            return bos + self.processor.encode(clean_prompt(prompt)) + self.processor.encode("\n")
        return bos + self.processor.encode(pi05_prompt_text(prompt, state))

    def pad_or_truncate(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Right-pad with 0 (mask False) or cut to ``max_len``, warning the first time a prompt is cut."""
        if len(ids) > self.max_len:
            message = "Token length (%d) exceeds max length (%d), truncating; consider a larger max_len."
            level = logging.DEBUG if self._warned_truncation else logging.WARNING
            logger.log(level, message, len(ids), self.max_len)
            self._warned_truncation = True
            ids = ids[: self.max_len]
        tokens = np.full(self.max_len, PAD_ID, dtype=np.int64)
        tokens[: len(ids)] = ids
        mask = np.zeros(self.max_len, dtype=bool)
        mask[: len(ids)] = True
        return tokens, mask

    def encode(self, prompt: str, state: np.ndarray | torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One prompt -> (int64 ids [max_len], bool mask [max_len]); passing ``state`` selects the PI0.5 format."""
        text = _as_text(prompt)
        ids = self.build_ids(text, None if state is None else _as_state(state))
        return self.pad_or_truncate(ids)

    def encode_batch(
        self,
        prompts: Sequence[str],
        states: np.ndarray | torch.Tensor | Sequence[np.ndarray] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Many prompts -> (LongTensor [B, max_len], BoolTensor [B, max_len]); ``states`` is [B, D] or None."""
        if isinstance(prompts, str):
            raise TypeError("encode_batch expects a sequence of prompts, got a single string; use encode()")
        if states is not None and len(states) != len(prompts):
            raise ValueError(f"Got {len(prompts)} prompts but {len(states)} states")
        tokens = np.zeros((len(prompts), self.max_len), dtype=np.int64)
        masks = np.zeros((len(prompts), self.max_len), dtype=bool)
        for i, prompt in enumerate(prompts):
            tokens[i], masks[i] = self.encode(prompt, None if states is None else states[i])
        return torch.from_numpy(tokens), torch.from_numpy(masks)

    def decode(self, tokens: Sequence[int] | np.ndarray | torch.Tensor, mask: np.ndarray | None = None) -> str:
        """Text of the valid ids (those under ``mask`` if given); special tokens are dropped. Meant for debugging."""
        ids = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens)
        if mask is not None:
            ids = ids[np.asarray(mask, dtype=bool)]
        return self.processor.decode(ids.tolist())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path}, max_len={self.max_len}, vocab_size={self.vocab_size})"


def train_small_tokenizer(texts: Sequence[str], path: str | Path, vocab_size: int = 400) -> Path:
    """Train a small SentencePiece model laid out like PaliGemma's (pad 0, eos 1, bos 2, unk 3, "\\n" a piece,
    byte fallback, no normalisation) on `texts`, and write it to `path`.

    For tests and demos with tiny models (whose embedding has far fewer than 257152 rows) when no PaliGemma
    tokenizer is at hand; real checkpoints always use the real PaliGemma tokenizer.
    """
    import io

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts) * 20),
        model_writer=buffer,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus may not fill vocab_size pieces; take what it supports
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        byte_fallback=True,
        user_defined_symbols=["\n"],
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        split_digits=True,
        minloglevel=2,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return path


EOS_ID = 1
ACTION_CUE = "Action: "
ACTION_END = "|"


class FASTPromptTokenizer(PromptTokenizer):
    """PI0-FAST prompts, as openpi's FASTTokenizer builds them.

    prefix (ar 0, no loss): BOS + encode(f"Task: {clean}, State: {256-bin state};\\n"), where clean is lower-cased,
    stripped, "_" -> " ", and the state is the quantile-normalised, unpadded robot state;
    postfix (ar 1, loss; training only): encode("Action: ") + PaliGemma ids of the FAST tokens (257023 - k)
    + encode("|") + EOS. Right-padded with 0 to `max_len` (openpi's pi0_fast_libero: 180).
    """

    fast_offset: int = 257_152 - 1 - 128
    """PaliGemma id of FAST id 0 (the model's `PI0FASTConfig.fast_offset`)."""

    def encode_fast(
        self, prompt: str, state: np.ndarray, action_ids: Sequence[int] | None = None
    ) -> dict[str, np.ndarray]:
        """tokens, mask, ar_mask, loss_mask (each (max_len,)) of the prefix, plus the postfix if `action_ids`."""
        return self.fast_layout(self.fast_prefix(prompt, state), action_ids)

    def fast_prefix(self, prompt: str, state: np.ndarray) -> list[int]:
        clean = _as_text(prompt).lower().strip().replace("_", " ")
        state_str = " ".join(map(str, discretize_state(_as_state(state))))
        return [self.processor.bos_id] + self.processor.encode(f"Task: {clean}, State: {state_str};\n")

    def fast_layout(self, prefix: list[int], action_ids: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """A prefix's ids followed (if `action_ids`) by the postfix, padded, with openpi's ar and loss masks."""
        from pi0_lightning.policy.fast_tokenizer import fast_to_paligemma

        postfix: list[int] = []
        if action_ids is not None:
            postfix = self.processor.encode(ACTION_CUE)
            postfix += [int(i) for i in fast_to_paligemma(list(action_ids), self.fast_offset)]
            postfix += self.processor.encode(ACTION_END) + [EOS_ID]
        tokens, mask = self.pad_or_truncate(prefix + postfix)
        ar = np.zeros(self.max_len, dtype=np.int64)
        ar[len(prefix) : len(prefix) + len(postfix)] = 1
        loss = ar.astype(bool)
        return {"tokens": tokens, "mask": mask, "ar_mask": ar & mask, "loss_mask": loss & mask}
