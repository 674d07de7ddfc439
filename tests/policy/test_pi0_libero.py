"""LiberoPolicy: raw LIBERO observations -> PI0 -> env actions, with a tiny random model and a small tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pi0_lightning.model.config import PI0Config
from pi0_lightning.model.pi0 import PI0
from pi0_lightning.policy.loading import load_policy
from pi0_lightning.policy.pi0_libero import LiberoPolicy, row_noise
from pi0_lightning.policy.tokenizer import PromptTokenizer, train_small_tokenizer
from pi0_lightning.policy.transforms import (
    PREPARED_IMAGES_KEY,
    LiberoTransforms,
    Normalizer,
    prepare_camera_images,
)

STATS = {
    "norm_stats": {
        "state": {"mean": [0.1] * 8, "std": [0.5] * 8, "q01": [-1.0] * 8, "q99": [1.0] * 8},
        "actions": {"mean": [0.0] * 7, "std": [0.2] * 7, "q01": [-1.0] * 7, "q99": [1.0] * 7},
    }
}
PROMPTS = ["pick up the black bowl and place it on the plate", "open the top drawer of the cabinet"]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    torch.manual_seed(0)
    model = PI0(PI0Config.variant("pi0_tiny", action_horizon=10)).eval()
    tok = PromptTokenizer.from_file(train_small_tokenizer(PROMPTS, tmp_path_factory.mktemp("tok") / "t.model"))
    return LiberoPolicy(model, tok, LiberoTransforms(Normalizer.from_json(STATS), delta_actions=True))


def raw_obs(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "agentview": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
        "wrist": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
        "eef_pos": rng.normal(size=3),
        "eef_quat": np.array([0.0, 0.0, 0.0, 1.0]),
        "gripper_qpos": np.array([0.02, -0.02]),
    }


def test_prepare_applies_openpi_preprocessing(policy):
    obs = raw_obs(0)
    (x,) = policy.prepare([obs], PROMPTS[:1])
    assert x.agentview.shape == (224, 224, 3) and x.agentview.dtype == np.uint8
    assert np.allclose(x.raw_state[:3], obs["eef_pos"]) and np.allclose(x.raw_state[3:6], 0)
    assert x.tokens.shape == (48,) and x.token_mask[0] and x.tokens[0] == 2  # BOS first


def test_batched_prepare_on_threads_equals_one_by_one(policy):
    observations = [raw_obs(seed) for seed in range(9)]  # a batch large enough for the thread pool
    prompts = [PROMPTS[i % 2] for i in range(9)]
    batched = policy.prepare(observations, prompts)
    for x, obs, prompt in zip(batched, observations, prompts, strict=True):
        (one,) = policy.prepare([obs], [prompt])
        for field in ("agentview", "wrist", "raw_state", "tokens", "token_mask"):
            assert np.array_equal(getattr(x, field), getattr(one, field))


def env_prepared(obs: dict, size: int) -> dict:
    """`obs` as a LIBERO worker with `image_size=size` sends it: images prepared from the same render, flagged."""
    agent, wrist = prepare_camera_images(obs["agentview"], obs["wrist"], size)
    return {**obs, "agentview": agent, "wrist": wrist, PREPARED_IMAGES_KEY: True}


@pytest.mark.parametrize(("variant", "size"), [("pi0_tiny", 224), ("pi0_micro", 112)])
def test_env_prepared_observations_give_identical_inputs(tmp_path, variant, size):
    """The same renders, raw or prepared by the env (`LiberoEnvConfig.image_size`), give bit-identical policy inputs
    and model observations; a size other than the model's is a clear error."""
    model = PI0(PI0Config.variant(variant, action_horizon=10)).eval()
    assert model.config.vision.image_size == size
    tok = train_small_tokenizer(PROMPTS, tmp_path / "t.model")
    policy = LiberoPolicy.build(model, STATS, tok)
    raw = [raw_obs(seed) for seed in range(5)]  # a batch large enough for the thread pool
    prompts = [PROMPTS[i % 2] for i in range(5)]
    a = policy.prepare(raw, prompts)
    b = policy.prepare([env_prepared(o, size) for o in raw], prompts)
    for x, y in zip(a, b, strict=True):
        assert x.agentview.shape == (size, size, 3)
        for field in ("agentview", "wrist", "raw_state", "tokens", "token_mask"):
            assert np.array_equal(getattr(x, field), getattr(y, field)), field
    obs_a, obs_b = policy.to_observation(a), policy.to_observation(b)
    for key in obs_a.images:
        assert torch.equal(obs_a.images[key], obs_b.images[key])
    assert torch.equal(obs_a.state, obs_b.state)
    other = 112 if size == 224 else 224
    with pytest.raises(ValueError, match=f"model takes {size}x{size}x3 uint8: build the env with image_size={size}"):
        policy.prepare([env_prepared(raw[0], other)], prompts[:1])


def test_act_returns_model_and_env_actions(policy):
    inputs = policy.prepare([raw_obs(0), raw_obs(1)], PROMPTS)
    model_actions, env_actions = policy.act(inputs, seeds=[3, 4])
    assert model_actions.shape == (2, 10, 32) and env_actions.shape == (2, 10, 7)
    # env = unnormalise (std 0.2, mean 0) + delta: the chunk-start state is added to dims 0..5
    expected = model_actions[..., :7] * (0.2 + 1e-6)
    expected[..., :6] += np.stack([x.raw_state[:6] for x in inputs])[:, None]
    np.testing.assert_allclose(env_actions, expected, rtol=1e-5, atol=1e-6)
    again, _ = policy.act(inputs, seeds=[3, 4])
    other, _ = policy.act(inputs, seeds=[3, 5])
    assert np.array_equal(model_actions, again)
    assert np.array_equal(model_actions[0], other[0]) and not np.array_equal(model_actions[1], other[1])
    with pytest.raises(ValueError, match="1 seeds for 2 inputs"):
        policy.act(inputs, seeds=[3])


def test_a_rows_actions_do_not_depend_on_the_rest_of_the_batch(policy):
    """Per-row noise: row a's chunk is a function of (a, its seed), alone or next to other rows, in any position."""
    a, b, c = policy.prepare([raw_obs(0), raw_obs(1), raw_obs(2)], [PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    alone, alone_env = policy.act([a], seeds=[11])
    pair, pair_env = policy.act([b, a], seeds=[12, 11])
    triple, _ = policy.act([c, b, a], seeds=[7, 8, 11])
    np.testing.assert_allclose(pair[1], alone[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(pair_env[1], alone_env[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(triple[2], alone[0], atol=1e-5, rtol=0)
    assert np.abs(pair[0] - alone[0]).max() > 0.1  # another row, another seed: another chunk
    # the noise itself is exactly the row's own draw
    torch.testing.assert_close(row_noise([12, 11], (10, 32), 2)[1], row_noise([11], (10, 32), 1)[0], atol=0, rtol=0)


def test_observation_masks_absent_right_wrist(policy):
    policy.drop_masked_cameras = False
    obs = policy.to_observation(policy.prepare([raw_obs(0)], PROMPTS[:1]))
    policy.drop_masked_cameras = True
    assert obs.image_masks["right_wrist_0_rgb"].tolist() == [False]
    assert obs.images["right_wrist_0_rgb"].eq(-1).all()
    assert obs.state.shape == (1, 32) and obs.state[0, 8:].eq(0).all()


def test_checkpoint_without_tokenizer_is_a_clear_error(tmp_path):
    PI0(PI0Config.variant("pi0_tiny")).save_pretrained(tmp_path / "ck", norm_stats=STATS)
    with pytest.raises(FileNotFoundError, match="bundles no PaliGemma tokenizer"):
        load_policy(tmp_path / "ck")


def test_dropping_the_always_masked_camera_changes_nothing(policy):
    inputs = policy.prepare([raw_obs(0), raw_obs(1)], PROMPTS)
    dropped = policy.to_observation(inputs)
    assert "right_wrist_0_rgb" not in dropped.images
    policy.drop_masked_cameras = False
    try:
        full = policy.to_observation(inputs)
        assert "right_wrist_0_rgb" in full.images
        noise = torch.randn(2, 10, 32)
        a = policy.model.sample_actions(full, noise=noise, num_steps=3)
        b = policy.model.sample_actions(dropped, noise=noise, num_steps=3)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    finally:
        policy.drop_masked_cameras = True
