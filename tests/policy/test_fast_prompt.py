"""PI0-FAST prompt layout (prefix/postfix, ar and loss masks) and action-id extraction."""

from __future__ import annotations

import numpy as np

from pi0_lightning.policy.fast_tokenizer import fast_to_paligemma
from pi0_lightning.policy.tokenizer import EOS_ID, FASTPromptTokenizer, train_small_tokenizer


def test_prefix_postfix_masks_with_a_real_sentencepiece_model(tmp_path):
    model = train_small_tokenizer(["Task: pick up the bowl, State: 1 2 3;\nAction: |"], tmp_path / "t.model")
    tok = FASTPromptTokenizer.from_file(model, max_len=96)
    state = np.array([-1.0, 0.0, 0.999])
    prefix_only = tok.encode_fast("Pick_up the bowl", state)
    full = tok.encode_fast("Pick_up the bowl", state, action_ids=[3, 17, 2047])
    n_prefix = int(prefix_only["mask"].sum())
    n = int(full["mask"].sum())
    assert full["tokens"][0] == 2 and full["tokens"][n - 1] == EOS_ID and not full["tokens"][n:].any()
    assert np.array_equal(full["tokens"][:n_prefix], prefix_only["tokens"][:n_prefix])
    assert not full["ar_mask"][:n_prefix].any() and full["ar_mask"][n_prefix:n].all() and not full["ar_mask"][n:].any()
    assert np.array_equal(full["loss_mask"], full["ar_mask"].astype(bool))
    assert set(fast_to_paligemma([3, 17, 2047]).tolist()) <= set(full["tokens"][n_prefix:n].tolist())
    assert not prefix_only["ar_mask"].any() and not prefix_only["loss_mask"].any()
    # openpi's FAST cleaning lower-cases (PI0's does not) and writes the discretised state
    assert "Task: pick up the bowl, State: 0 128 255;\n" in tok.decode(prefix_only["tokens"], prefix_only["mask"])
