"""PromptTokenizer against a tiny SentencePiece model trained on the fly (no downloads).

The model copies the PaliGemma properties that matter to the prompt format: pad=0, eos=1, bos=2, unk=3, byte
fallback, no whitespace normalisation, no dummy prefix, digits split, and "\\n" as a piece of its own. It is a
unigram model (PaliGemma's is BPE) because a unigram vocabulary converts losslessly into a ``tokenizer.json``,
which lets the Hugging Face fallback be checked id-for-id against SentencePiece.
"""

from __future__ import annotations

import logging
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import torch

from pi0_lightning.policy.tokenizer import (
    PI0_MAX_LEN,
    PI05_MAX_LEN,
    PromptTokenizer,
    clean_prompt,
    default_max_len,
    discretize_state,
    find_tokenizer_file,
    train_small_tokenizer,
)

LIBERO_PROMPTS = [
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "put both the alphabet soup and the tomato sauce in the basket",
    "open the top drawer and put the bowl inside",
    "turn on the stove and put the moka pot on it",
    "put the white mug on the left plate and put the yellow and white mug on the right plate",
    "pick up the ketchup and place it in the basket",
    "put the cream cheese in the bowl",
    "push the plate to the front of the stove",
]
# The state-prompt scaffolding is in the corpus too, so its pieces exist as in the real vocabulary.
TRAINING_TEXT = LIBERO_PROMPTS + ["Task: put the bowl on the plate, State: 128 0 255 17 64 99;\nAction: "]

LOGGER_NAME = "pi0_lightning.policy.tokenizer"


@pytest.fixture(scope="session")
def sp_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding ``paligemma_tokenizer.model``, a toy model laid out like PaliGemma's."""
    directory = tmp_path_factory.mktemp("sp_tokenizer")
    train_small_tokenizer(TRAINING_TEXT, directory / "paligemma_tokenizer.model")
    return directory


@pytest.fixture(scope="session")
def model_file(sp_model_dir: Path) -> Path:
    return sp_model_dir / "paligemma_tokenizer.model"


@pytest.fixture(scope="session")
def sp(model_file: Path) -> sentencepiece.SentencePieceProcessor:
    """The raw processor, used to compute openpi's expected ids by hand."""
    return sentencepiece.SentencePieceProcessor(model_file=str(model_file))


@pytest.fixture()
def tok(model_file: Path) -> PromptTokenizer:
    # Function scope: the truncation warning is once per instance, so tests must not share one.
    return PromptTokenizer.from_file(model_file)


@pytest.fixture(scope="session")
def hf_json_dir(tmp_path_factory: pytest.TempPathFactory, sp: sentencepiece.SentencePieceProcessor) -> Path:
    """The same vocabulary as a Hugging Face ``tokenizer.json`` (Gemma-style: spaces become U+2581)."""
    tokenizers = pytest.importorskip("tokenizers")
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.vocab_size())]
    hf = tokenizers.Tokenizer(tokenizers.models.Unigram(pieces, unk_id=sp.unk_id(), byte_fallback=True))
    hf.normalizer = tokenizers.normalizers.Replace(" ", "\u2581")
    hf.decoder = tokenizers.decoders.Sequence(
        [tokenizers.decoders.Replace("\u2581", " "), tokenizers.decoders.ByteFallback(), tokenizers.decoders.Fuse()]
    )
    hf.add_special_tokens([tokenizers.AddedToken(p, special=True) for p in ("<pad>", "<eos>", "<bos>", "<unk>")])
    hf.add_tokens([tokenizers.AddedToken("\n", normalized=False)])
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    hf.save(str(directory / "tokenizer.json"))
    return directory


def openpi_pi0_ids(sp: sentencepiece.SentencePieceProcessor, prompt: str) -> list[int]:
    """openpi's PI0 recipe written out longhand."""
    clean = prompt.strip().replace("_", " ").replace("\n", " ")
    return sp.encode(clean, add_bos=True) + sp.encode("\n")


def valid(tokens: np.ndarray, mask: np.ndarray) -> list[int]:
    return tokens[mask].tolist()


# --- PI0 format -------------------------------------------------------------------------------------------------


def test_model_fixture_mirrors_paligemma_special_ids(sp: sentencepiece.SentencePieceProcessor) -> None:
    assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 3)
    newline = sp.encode("\n")
    assert len(newline) == 1 and sp.id_to_piece(newline[0]) == "\n"


def test_bos_first_and_newline_last(tok: PromptTokenizer, sp: sentencepiece.SentencePieceProcessor) -> None:
    tokens, mask = tok.encode(LIBERO_PROMPTS[0])
    ids = valid(tokens, mask)
    assert ids[0] == sp.bos_id() == 2
    assert ids[-1] == sp.encode("\n")[0]
    assert ids.count(sp.bos_id()) == 1


@pytest.mark.parametrize("prompt", LIBERO_PROMPTS + ["Put the Bowl on the plate.", "zebra quux \u03a9 42"])
def test_ids_match_openpi_recipe(model_file: Path, sp: sentencepiece.SentencePieceProcessor, prompt: str) -> None:
    # The toy vocabulary splits words finely, so leave room: this test is about ids, not truncation.
    tokens, mask = PromptTokenizer.from_file(model_file, max_len=PI05_MAX_LEN).encode(prompt)
    assert valid(tokens, mask) == openpi_pi0_ids(sp, prompt)


def test_underscores_and_newlines_are_cleaned(tok: PromptTokenizer, sp: sentencepiece.SentencePieceProcessor) -> None:
    messy = "  put_the_bowl\non the plate \n"
    assert clean_prompt(messy) == "put the bowl on the plate"
    tokens, mask = tok.encode(messy)
    assert valid(tokens, mask) == sp.encode("put the bowl on the plate", add_bos=True) + sp.encode("\n")
    # The only newline left is the appended start-of-answer token.
    assert tok.decode(tokens, mask) == "put the bowl on the plate\n"


def test_case_is_kept(tok: PromptTokenizer) -> None:
    tokens, mask = tok.encode("Pick up the Bowl")
    assert tok.decode(tokens, mask) == "Pick up the Bowl\n"


def test_right_padding_with_zero_and_mask(tok: PromptTokenizer, sp: sentencepiece.SentencePieceProcessor) -> None:
    tokens, mask = tok.encode("open the top drawer")
    n = len(openpi_pi0_ids(sp, "open the top drawer"))
    assert tokens.shape == mask.shape == (PI0_MAX_LEN,)
    assert tokens.dtype == np.int64 and mask.dtype == np.bool_
    assert mask[:n].all() and not mask[n:].any()
    assert (tokens[n:] == 0).all()


def test_truncation_cuts_and_warns_once(
    model_file: Path, sp: sentencepiece.SentencePieceProcessor, caplog: pytest.LogCaptureFixture
) -> None:
    tok = PromptTokenizer.from_file(model_file, max_len=6)
    full = openpi_pi0_ids(sp, LIBERO_PROMPTS[0])
    assert len(full) > 6
    with caplog.at_level(logging.DEBUG, logger=LOGGER_NAME):
        tokens, mask = tok.encode(LIBERO_PROMPTS[0])
        tok.encode(LIBERO_PROMPTS[4])
    assert tokens.tolist() == full[:6]
    assert mask.all()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"({len(full)})" in warnings[0].getMessage() and "(6)" in warnings[0].getMessage()
    # Later truncations are still logged, just quietly.
    assert any(r.levelno == logging.DEBUG for r in caplog.records)


def test_exact_fit_is_not_truncated(
    model_file: Path, sp: sentencepiece.SentencePieceProcessor, caplog: pytest.LogCaptureFixture
) -> None:
    full = openpi_pi0_ids(sp, LIBERO_PROMPTS[2])
    tok = PromptTokenizer.from_file(model_file, max_len=len(full))
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        tokens, mask = tok.encode(LIBERO_PROMPTS[2])
    assert tokens.tolist() == full and mask.all()
    assert not caplog.records


def test_non_str_prompts(tok: PromptTokenizer) -> None:
    expected = tok.encode("put the cream cheese in the bowl")[0]
    for prompt in (b"put the cream cheese in the bowl", np.array("put the cream cheese in the bowl")):
        np.testing.assert_array_equal(tok.encode(prompt)[0], expected)
    with pytest.raises(TypeError):
        tok.encode(3)


# --- batching -----------------------------------------------------------------------------------------------------


def test_encode_batch_shapes_dtypes_and_rows(tok: PromptTokenizer) -> None:
    tokens, mask = tok.encode_batch(LIBERO_PROMPTS[:3])
    assert tokens.shape == mask.shape == (3, PI0_MAX_LEN)
    assert tokens.dtype == torch.long and mask.dtype == torch.bool
    for row, prompt in enumerate(LIBERO_PROMPTS[:3]):
        ids, valid_mask = tok.encode(prompt)
        assert tokens[row].tolist() == ids.tolist()
        assert mask[row].tolist() == valid_mask.tolist()


def test_encode_batch_with_states(model_file: Path) -> None:
    tok = PromptTokenizer.from_file(model_file, max_len=PI05_MAX_LEN)
    states = np.array([[0.0, -1.0, 0.999], [0.5, -0.5, 0.25]], dtype=np.float32)
    tokens, mask = tok.encode_batch(LIBERO_PROMPTS[:2], states)
    assert tokens.shape == (2, PI05_MAX_LEN)
    assert tokens[1].tolist() == tok.encode(LIBERO_PROMPTS[1], states[1])[0].tolist()
    torch_tokens, torch_mask = tok.encode_batch(LIBERO_PROMPTS[:2], torch.from_numpy(states))
    assert torch.equal(torch_tokens, tokens) and torch.equal(torch_mask, mask)


def test_encode_batch_rejects_bad_input(tok: PromptTokenizer) -> None:
    with pytest.raises(ValueError, match="2 prompts but 1 states"):
        tok.encode_batch(LIBERO_PROMPTS[:2], np.zeros((1, 3)))
    with pytest.raises(TypeError):
        tok.encode_batch("a single prompt")


# --- PI0.5 format -----------------------------------------------------------------------------------------------


def test_discretize_state_bins() -> None:
    # Bin edges are -1 + k/128. Below -1 digitize returns 0, so the bin is -1: openpi does not clip, nor do we.
    state = np.array([-1.0, 0.0, 0.999, 1.0, -0.99, -1.5, 2.0])
    assert discretize_state(state).tolist() == [0, 128, 255, 255, 1, -1, 255]


def test_pi05_prompt_string_and_ids(model_file: Path, sp: sentencepiece.SentencePieceProcessor) -> None:
    tok = PromptTokenizer.from_file(model_file, max_len=PI05_MAX_LEN)
    state = np.array([0.0, -1.0, 0.999], dtype=np.float32)
    tokens, mask = tok.encode("  Pick_up the bowl\n", state)
    expected_text = "Task: Pick up the bowl, State: 128 0 255;\nAction: "
    ids = valid(tokens, mask)
    assert ids == sp.encode(expected_text, add_bos=True)
    assert ids[0] == 2 and sp.encode("\n")[0] in ids  # no separate trailing newline token in this format
    assert tok.decode(tokens, mask) == expected_text


def test_pi05_state_below_range_prints_minus_one(model_file: Path) -> None:
    tok = PromptTokenizer.from_file(model_file, max_len=PI05_MAX_LEN)
    tokens, mask = tok.encode("open the drawer", np.array([-1.2, 1.5]))
    assert tok.decode(tokens, mask) == "Task: open the drawer, State: -1 255;\nAction: "


def test_pi05_accepts_torch_state(model_file: Path) -> None:
    tok = PromptTokenizer.from_file(model_file, max_len=PI05_MAX_LEN)
    state = np.array([0.3, -0.7], dtype=np.float32)
    expected = tok.encode("open the drawer", state)[0]
    np.testing.assert_array_equal(tok.encode("open the drawer", torch.from_numpy(state))[0], expected)


def test_pi05_state_must_be_one_dimensional(tok: PromptTokenizer) -> None:
    with pytest.raises(ValueError, match="1-D"):
        tok.encode("open the drawer", np.zeros((2, 3)))


def test_default_max_len() -> None:
    assert default_max_len(pi05=False) == 48
    assert default_max_len(pi05=True) == 200


# --- loading and errors -----------------------------------------------------------------------------------------


def test_from_file_and_from_directory_agree(sp_model_dir: Path, model_file: Path) -> None:
    from_dir = PromptTokenizer.from_file(sp_model_dir)
    from_file = PromptTokenizer.from_file(model_file)
    assert from_dir.path == from_file.path == model_file
    assert from_dir.vocab_size == from_file.vocab_size > 256
    assert from_dir.encode(LIBERO_PROMPTS[3])[0].tolist() == from_file.encode(LIBERO_PROMPTS[3])[0].tolist()


def test_find_tokenizer_file_order(tmp_path: Path, model_file: Path) -> None:
    assert find_tokenizer_file(tmp_path) is None
    assert find_tokenizer_file(tmp_path / "missing") is None
    (tmp_path / "tokenizer.json").write_text("{}")
    assert find_tokenizer_file(tmp_path) == tmp_path / "tokenizer.json"
    # SentencePiece wins over tokenizer.json: it is what openpi loads.
    (tmp_path / "tokenizer.model").write_bytes(model_file.read_bytes())
    assert find_tokenizer_file(tmp_path) == tmp_path / "tokenizer.model"


def test_missing_path_raises_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model") as info:
        PromptTokenizer.from_file(missing)
    assert "tokenizer.model" in str(info.value) and "\n" not in str(info.value)


def test_directory_without_tokenizer_raises(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as info:
        PromptTokenizer.from_file(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert all(name in message for name in ("tokenizer.model", "paligemma_tokenizer.model", "tokenizer.json"))


@pytest.mark.parametrize("content", [b"", b"this is not a sentencepiece model"])
def test_unreadable_model_raises_value_error(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match="tokenizer.model"):
        PromptTokenizer.from_file(bad)


def test_unreadable_json_raises_value_error(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        PromptTokenizer.from_file(tmp_path)


def test_json_without_tokenizers_package_says_how_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(ImportError, match="pip install tokenizers"):
        PromptTokenizer.from_file(tmp_path)


def test_pickle_round_trip(tok: PromptTokenizer) -> None:
    # Data-loader workers receive the tokenizer by pickling.
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.path == tok.path
    assert clone.encode(LIBERO_PROMPTS[5])[0].tolist() == tok.encode(LIBERO_PROMPTS[5])[0].tolist()


# --- Hugging Face tokenizer.json fallback -----------------------------------------------------------------------


@pytest.mark.parametrize("state", [None, np.array([0.0, -1.0, 0.999])])
def test_tokenizer_json_matches_sentencepiece(hf_json_dir: Path, model_file: Path, state: np.ndarray | None) -> None:
    hf_tok = PromptTokenizer.from_file(hf_json_dir, max_len=PI05_MAX_LEN)
    sp_tok = PromptTokenizer.from_file(model_file, max_len=PI05_MAX_LEN)
    assert hf_tok.path == hf_json_dir / "tokenizer.json"
    for prompt in [*LIBERO_PROMPTS, "  put_the bowl\non the plate "]:
        hf_ids, hf_mask = hf_tok.encode(prompt, state)
        sp_ids, sp_mask = sp_tok.encode(prompt, state)
        assert hf_ids.tolist() == sp_ids.tolist()
        assert hf_mask.tolist() == sp_mask.tolist()
    assert hf_tok.decode(*hf_tok.encode("open the drawer")) == "open the drawer\n"


def test_tokenizer_json_without_bos_is_rejected(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="BOS"):
        PromptTokenizer.from_file(tmp_path)
