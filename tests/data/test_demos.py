"""Demonstrations -> supervised samples: chunks, episode ends, delta actions, normalisation, prompts, images, the
few-shot choice and the norm stats, on an in-memory source (the file formats are tested on their own)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from memory_source import MemorySource
from torch.utils.data import DataLoader

from pi0_lightning.data.augment import AugmentConfig
from pi0_lightning.data.demos import DemoDataset, select_episodes, supervised_collate
from pi0_lightning.data.norm_stats import compute_norm_stats, model_space_chunks
from pi0_lightning.data.source import DatasetError
from pi0_lightning.model.config import PI0Config
from pi0_lightning.model.pi0 import PI0
from pi0_lightning.policy.assets import small_prompt_tokenizer
from pi0_lightning.policy.pi0_libero import LiberoPolicy
from pi0_lightning.policy.transforms import resize_with_pad

H = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    source = MemorySource()
    stats = compute_norm_stats(source, H, delta_actions=True)
    model = PI0(PI0Config.variant("pi0_micro", action_horizon=H))
    tasks = sorted({e.task for e in source.episodes})
    tok = small_prompt_tokenizer(tasks, tmp_path_factory.mktemp("tok") / "t.model", min(1000, model.config.vocab_size))
    policy = LiberoPolicy.build(model, stats, tok, delta_actions=True)
    return source, stats, policy.inputs_only()


def test_sample_is_what_was_written(setup):
    source, stats, inputs = setup
    ds = DemoDataset(source, [0, 1], inputs, H, augment=None)
    assert len(ds) == 7 + 5 and inputs.model is None
    i = 7 + 3  # episode 1 (5 steps), step 3: the chunk runs one step past the end
    s = ds[i]
    size = inputs.transforms.image_size
    np.testing.assert_array_equal(s.inputs.agentview, resize_with_pad(source.images[1][3], size, size))
    np.testing.assert_array_equal(s.inputs.wrist, resize_with_pad(source.wrist[1][3], size, size))
    np.testing.assert_array_equal(s.inputs.raw_state, source.state[1][3])
    expected = source.actions[1][[3, 4, 4, 4]].astype(np.float64)  # the last action repeated, as openpi
    expected[:, :6] -= source.state[1][3][:6]
    a = inputs.transforms.normalizer.normalize_actions(expected)
    np.testing.assert_allclose(s.actions[:, :7], a, atol=1e-6)
    assert s.actions.shape == (H, 32) and not s.actions[:, 7:].any() and s.action_mask.all()
    tokens, mask = inputs.tokenizer.encode(source.episodes[1].task)
    np.testing.assert_array_equal(s.inputs.tokens, tokens)
    np.testing.assert_array_equal(s.inputs.token_mask, mask)
    masked = DemoDataset(source, [0, 1], inputs, H, mask_padded_actions=True)[i]
    assert masked.action_mask.tolist() == [True, True, False, False]


def test_batches_through_worker_processes_equal_in_process(setup):
    source, _, inputs = setup
    ds = DemoDataset(source, [0, 2], inputs, H, augment=None)

    def batches(workers):
        loader = DataLoader(ds, batch_size=5, num_workers=workers, collate_fn=lambda b: supervised_collate(b, inputs))
        return list(loader)

    one, two = batches(0), batches(2)
    assert len(one) == len(two) == 4
    for a, b in zip(one, two, strict=True):
        torch.testing.assert_close(a["actions"], b["actions"])
        torch.testing.assert_close(a["obs"].images["base_0_rgb"], b["obs"].images["base_0_rgb"])
        torch.testing.assert_close(a["obs"].tokenized_prompt, b["obs"].tokenized_prompt)
    assert one[0]["obs"].state.shape == (5, 32) and one[0]["actions"].shape == (5, H, 32)


def test_augmentation_changes_only_the_images(setup):
    source, _, inputs = setup
    plain = DemoDataset(source, [0], inputs, H)[2]
    augmented = DemoDataset(source, [0], inputs, H, augment=AugmentConfig())[2]
    assert not np.array_equal(plain.inputs.agentview, augmented.inputs.agentview)
    np.testing.assert_array_equal(plain.actions, augmented.actions)


def test_few_shot_choice_is_seeded_per_task_and_holds_out_validation():
    source = MemorySource(lengths=(3,) * 12, tasks=("a", "b", "c"))
    train, val = select_episodes(source, per_task=2, val_per_task=1, seed=5)
    assert len(train) == 6 and len(val) == 3 and not set(train) & set(val)
    for task in "abc":
        assert sum(source.episodes[e].task == task for e in train) == 2
    assert select_episodes(source, 2, 1, seed=5) == (train, val)
    assert select_episodes(source, 2, 1, seed=6) != (train, val)
    assert len(select_episodes(source, None)[0]) == 12
    with pytest.raises(DatasetError, match="no training episodes"):
        select_episodes(source, per_task=2, val_per_task=4)


def test_norm_stats_equal_numpy():
    source = MemorySource()
    stats = compute_norm_stats(source, H, delta_actions=True)["norm_stats"]
    state = np.concatenate(source.state).astype(np.float64)
    actions = np.concatenate(
        [model_space_chunks(s, a, H, True).reshape(-1, 7) for s, a in zip(source.state, source.actions, strict=True)]
    )
    assert actions.shape == (sum(e.length for e in source.episodes) * H, 7)
    for key, x in (("state", state), ("actions", actions)):
        np.testing.assert_allclose(stats[key]["mean"], x.mean(0))
        np.testing.assert_allclose(stats[key]["std"], x.std(0))
        np.testing.assert_allclose(stats[key]["q01"], np.quantile(x, 0.01, axis=0))
        np.testing.assert_allclose(stats[key]["q99"], np.quantile(x, 0.99, axis=0))
    # step 0 of episode 0: its chunk minus its own state in the 6 pose dims, the gripper absolute
    chunk = model_space_chunks(source.state[0], source.actions[0], H, True)[0]
    np.testing.assert_allclose(chunk[:, :6], source.actions[0][:H, :6] - source.state[0][0, :6], rtol=1e-6)
    np.testing.assert_allclose(chunk[:, 6], source.actions[0][:H, 6], rtol=1e-6)
