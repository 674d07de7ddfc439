"""From episodes to training samples: RLOO groups, one sample per chunk, masked padding, batches with token records."""

from __future__ import annotations

import numpy as np
import torch

from pi0_lightning.data.samples import chunk_samples, collate, pad_samples
from pi0_lightning.policy.pi0_fast_libero import TokenRecord
from pi0_lightning.rl.advantages import group_episodes
from pi0_lightning.rollout.types import Chunk, EpisodeRequest, EpisodeResult


def episode(group: int, success: bool, n_chunks: int, n_tokens: int | None = None, valid: bool = True):
    chunks = []
    for i in range(n_chunks):
        record = None
        if n_tokens is not None:
            record = TokenRecord(np.arange(n_tokens) + 10 * i, -np.arange(n_tokens, dtype=np.float32), True)
        chunks.append(Chunk({"step": i}, np.full((4, 3), i + 1.0, np.float32), 2, 2 * i, record))
    return EpisodeResult(EpisodeRequest(0, 0, "p", group=group), success=success, chunks=chunks, valid=valid)


def test_groups_advantages_and_dropping():
    eps = [episode(0, True, 1), episode(0, False, 2), episode(1, True, 1), episode(1, True, 1)]
    eps += [episode(2, True, 1), episode(2, False, 1, valid=False)]
    groups, dropped = group_episodes(eps, group_size=2)
    assert dropped == 1 and [g.group for g in groups] == [0, 1]
    assert groups[0].advantages.tolist() == [1.0, -1.0] and groups[0].useful and not groups[1].useful
    samples = chunk_samples(groups[:1], robot_action_dim=2)
    assert [s.advantage for s in samples] == [1.0, -1.0, -1.0]
    assert not samples[0].actions[:, 2:].any() and samples[0].action_mask.tolist() == [True, True, False, False]


def test_padding_is_masked_and_token_records_batch_right_padded():
    groups, _ = group_episodes([episode(0, True, 1, n_tokens=3), episode(0, False, 1, n_tokens=5)], 2)
    samples = pad_samples(chunk_samples(groups), 4)
    assert [s.valid for s in samples] == [True, True, False, False] and samples[3].advantage == 0.0
    batch = collate(samples, to_observation=lambda inputs: inputs)
    assert batch["tokens"].shape == (4, 5) and batch["token_mask"].sum(1).tolist() == [3, 5, 3, 3]
    assert batch["tokens"][0].tolist() == [0, 1, 2, 0, 0] and batch["logp_old"][1, 4] == -4.0
    assert batch["valid"].tolist() == [True, True, False, False]
    plain = collate(chunk_samples(group_episodes([episode(0, True, 1), episode(0, False, 1)], 2)[0]), lambda x: x)
    assert "tokens" not in plain and torch.equal(plain["advantages"], torch.tensor([1.0, -1.0]))
