"""FAST action tokenizer: DCT maths, PaliGemma id mapping, fit + round trip within the quantisation bound."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from pi0_lightning.policy.fast_tokenizer import FASTActionTokenizer, dct_matrix, fast_to_paligemma

pytest.importorskip("tokenizers")


def smooth_chunks(n: int, t: int = 10, d: int = 7, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    steps = rng.normal(0, 0.1, (n, t, d))
    return np.clip(np.cumsum(steps, axis=1) + rng.uniform(-0.5, 0.5, (n, 1, d)), -1, 1)


def test_dct_is_orthonormal_and_dc_is_the_scaled_mean():
    c = dct_matrix(10)
    np.testing.assert_allclose(c @ c.T, np.eye(10), atol=1e-12)
    x = np.full(10, 0.3)
    np.testing.assert_allclose(c @ x, [0.3 * np.sqrt(10)] + [0] * 9, atol=1e-12)


def test_paligemma_mapping():
    assert fast_to_paligemma([0, 1, 2047]).tolist() == [257023, 257022, 254976]
    assert fast_to_paligemma(fast_to_paligemma([5, 77])).tolist() == [5, 77]
    assert fast_to_paligemma([0], offset=1407).tolist() == [1407]


@pytest.fixture(scope="module")
def tokenizer():
    return FASTActionTokenizer.fit(smooth_chunks(300), scale=10, vocab_size=512)


def test_round_trip_within_quantisation_bound(tokenizer):
    t, d = 10, 7
    bound = np.sqrt(t * d) / (2 * tokenizer.scale)  # L2 bound of rounding each coefficient, orthonormal DCT
    for chunk in smooth_chunks(50, seed=1):
        ids = tokenizer.encode(chunk)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        back = tokenizer.decode(ids, t, d)
        assert np.linalg.norm(back - chunk) <= bound + 1e-9


def test_bpe_compresses_smooth_chunks(tokenizer):
    lengths = [len(tokenizer.encode(c)) for c in smooth_chunks(50, seed=2)]
    assert np.mean(lengths) < 70  # fewer tokens than the 70 coefficients


def test_wrong_shape_decodes_to_zeros_with_a_warning(tokenizer, caplog):
    ids = tokenizer.encode(smooth_chunks(1)[0])
    with caplog.at_level(logging.WARNING):
        out = tokenizer.decode(ids, 12, 7)
    assert (
        not out.any() and out.shape == (12, 7) and "12 x 7" in caplog.text and tokenizer.try_decode(ids, 12, 7) is None
    )


def test_save_and_load(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "fast")
    loaded = FASTActionTokenizer.from_pretrained(tmp_path / "fast")
    chunk = smooth_chunks(1, seed=3)[0]
    assert loaded.encode(chunk) == tokenizer.encode(chunk)
    assert (loaded.scale, loaded.min_token) == (tokenizer.scale, tokenizer.min_token)
    with pytest.raises(FileNotFoundError, match="processor_config.json"):
        FASTActionTokenizer.from_pretrained(tmp_path)


def test_byte_level_processor_files_round_trip(tmp_path):
    """A processor directory whose tokenizer.json is a byte-level BPE (characters above 127 become several bytes),
    with the published processor's config keys: encode/decode go through the tokenizer's own pre-tokenizer and
    decoder."""
    import json

    tk = pytest.importorskip("tokenizers")
    probe = FASTActionTokenizer(None, scale=10, min_token=-354)
    chunks = smooth_chunks(200, seed=7)
    bpe = tk.Tokenizer(tk.models.BPE())
    bpe.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=1024, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator((probe._text(c) for c in chunks), trainer=trainer)
    (tmp_path / "fast").mkdir()
    bpe.save(str(tmp_path / "fast" / "tokenizer.json"))
    config = {"scale": 10, "vocab_size": 1024, "min_token": -354, "time_horizon": None, "action_dim": None}
    (tmp_path / "fast" / "processor_config.json").write_text(json.dumps(config))
    loaded = FASTActionTokenizer.from_pretrained(tmp_path / "fast")
    for chunk in smooth_chunks(5, seed=8):
        decoded = loaded.decode(loaded.encode(chunk), 10, 7)
        assert np.linalg.norm(decoded - chunk) <= np.sqrt(70) / (2 * 10) + 1e-9
