"""The PI0-FAST LIBERO policy: openpi's inputs, id-level action extraction, decoding, LOOP records, loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pi0_lightning.model.pi0_fast import EOS_ID, PI0FAST, PI0FASTConfig
from pi0_lightning.policy.assets import small_prompt_tokenizer, smooth_chunks, synthetic_fast_tokenizer
from pi0_lightning.policy.loading import load_policy
from pi0_lightning.policy.pi0_fast_libero import FAST_TOKENIZER_DIR, LiberoFASTPolicy
from pi0_lightning.policy.transforms import PREPARED_IMAGES_KEY, prepare_camera_images

pytest.importorskip("tokenizers")

PROMPT = "put the bowl on the plate"
STATS = {
    "norm_stats": {
        "state": {"mean": [0.0] * 8, "std": [1.0] * 8, "q01": [-2.0] * 8, "q99": [2.0] * 8},
        "actions": {"mean": [0.0] * 7, "std": [1.0] * 7, "q01": [-0.5] * 7, "q99": [0.5] * 7},
    }
}


def raw_obs(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "agentview": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8),
        "wrist": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8),
        "eef_pos": rng.uniform(-0.5, 0.5, 3),
        "eef_quat": np.array([0.0, 0.0, 0.0, 1.0]),
        "gripper_qpos": np.array([0.02, -0.02]),
    }


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fast_policy")
    tok = small_prompt_tokenizer([PROMPT], tmp / "tokenizer.model", vocab_size=1000, fast=True)
    return tok, synthetic_fast_tokenizer(10, 7)


@pytest.fixture()
def policy(assets):
    torch.manual_seed(0)
    model = PI0FAST(PI0FASTConfig.variant("pi0_fast_micro")).eval()
    return LiberoFASTPolicy.build(model, STATS, assets[0], assets[1], max_decoding_steps=24)


def test_inputs_follow_openpi_fast(policy):
    inputs = policy.prepare([raw_obs(0), raw_obs(1)], [PROMPT] * 2)
    obs = policy.to_observation(inputs)
    assert all(m.all() for m in obs.image_masks.values())  # FAST keeps the absent right wrist valid
    assert obs.images["right_wrist_0_rgb"].eq(-1).all()
    assert not obs.token_ar_mask.any() and obs.tokenized_prompt.shape == (2, 128)
    text = policy.tokenizer.decode(inputs[0].tokens, inputs[0].token_mask)
    state = policy.transforms.normalizer.normalize_state(inputs[0].raw_state[None])[0]
    bins = np.digitize(state, np.linspace(-1, 1, 257)[:-1]) - 1
    assert f"Task: {PROMPT}, State: {' '.join(map(str, bins))};\n" in text


@pytest.mark.parametrize(("variant", "size"), [("pi0_fast_tiny", 224), ("pi0_fast_micro", 112)])
def test_env_prepared_observations_give_identical_inputs(assets, variant, size):
    """PI0-FAST prepares images as PI0 does: raw renders and the env's prepared images (`LiberoEnvConfig.image_size`)
    give identical inputs; another size is a clear error."""
    model = PI0FAST(PI0FASTConfig.variant(variant)).eval()
    assert model.config.vision.image_size == size
    policy = LiberoFASTPolicy.build(model, STATS, assets[0], assets[1])
    rng = np.random.default_rng(size)
    raw = [{**raw_obs(k), "agentview": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)} for k in range(2)]
    for o in raw:
        o["wrist"] = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)

    def env_prepared(o: dict, s: int) -> dict:
        agent, wrist = prepare_camera_images(o["agentview"], o["wrist"], s)
        return {**o, "agentview": agent, "wrist": wrist, PREPARED_IMAGES_KEY: True}

    a = policy.prepare(raw, [PROMPT] * 2)
    b = policy.prepare([env_prepared(o, size) for o in raw], [PROMPT] * 2)
    for x, y in zip(a, b, strict=True):
        assert x.agentview.shape == (size, size, 3)
        for field in ("agentview", "wrist", "raw_state", "tokens", "token_mask"):
            assert np.array_equal(getattr(x, field), getattr(y, field)), field
    obs_a, obs_b = policy.to_observation(a), policy.to_observation(b)
    assert all(torch.equal(obs_a.images[k], obs_b.images[k]) for k in obs_a.images)
    other = 112 if size == 224 else 224
    with pytest.raises(ValueError, match=f"model takes {size}x{size}x3 uint8"):
        policy.prepare([env_prepared(raw[0], other)], [PROMPT])


def test_action_ids_are_found_between_the_cue_and_the_end(policy):
    inputs = policy.prepare([raw_obs(0)], [PROMPT])
    chunk = smooth_chunks(1, 10, 7, seed=5)
    obs = policy.training_observation(inputs, chunk)
    postfix = obs.tokenized_prompt[0][obs.token_loss_mask[0]].tolist()
    assert postfix[-1] == EOS_ID
    fast = policy.action_tokenizer.encode(chunk[0])
    assert policy.action_ids(postfix) == fast
    decoded, ok = policy.decode_chunk(postfix)
    assert ok and np.abs(decoded - chunk[0]).max() <= 0.5 / policy.action_tokenizer.scale * np.sqrt(70)
    # no cue, a text id inside the action span, or a wrong length: openpi's zero chunk
    assert policy.action_ids(postfix[len(policy._cue) :]) is None
    assert policy.action_ids(policy._cue + [5] + postfix[len(policy._cue) :]) is None
    zeros, ok = policy.decode_chunk(policy._cue + postfix[len(policy._cue) : len(policy._cue) + 1] + [EOS_ID])
    assert not ok and not zeros.any()


def test_act_returns_env_actions_and_token_records(policy):
    inputs = policy.prepare([raw_obs(0), raw_obs(1), raw_obs(2)], [PROMPT] * 3)
    policy.temperature = 1.0
    model_actions, env_actions, records = policy.act(inputs, seeds=[3, 4, 5])
    again = policy.act(inputs, seeds=[3, 4, 5])[2]
    assert model_actions.shape == (3, 10, 7) and env_actions.shape == (3, 10, 7) and len(records) == 3
    expected = policy.transforms.outputs(model_actions, np.stack([x.raw_state for x in inputs]))
    np.testing.assert_allclose(env_actions, expected)
    for r, r2 in zip(records, again, strict=True):
        assert np.array_equal(r.tokens, r2.tokens) and np.array_equal(r.logp, r2.logp)
        assert (r.logp <= 0).all() and (r.tokens[-1] == EOS_ID or len(r.tokens) == 24)
        assert not (r.tokens[:-1] == EOS_ID).any()


@pytest.mark.parametrize("temperature", [0.0, 8.0])  # a random model is nearly one-hot: T = 8 spreads it
def test_a_rows_tokens_do_not_depend_on_the_rest_of_the_batch(policy, temperature):
    """Row a decodes the same tokens (and log-probs) alone or next to other rows: per-row random numbers when
    sampling, none when greedy."""
    policy.temperature = temperature
    a, b, c = policy.prepare([raw_obs(0), raw_obs(1), raw_obs(2)], [PROMPT] * 3)
    _, alone_env, (alone,) = policy.act([a], seeds=[11])
    _, pair_env, pair = policy.act([b, a], seeds=[12, 11])
    _, _, triple = policy.act([c, b, a], seeds=[7, 8, 11])
    for row in (pair[1], triple[2]):
        assert np.array_equal(row.tokens, alone.tokens)
        np.testing.assert_allclose(row.logp, alone.logp, atol=1e-5, rtol=0)
    np.testing.assert_allclose(pair_env[1], alone_env[0], atol=1e-6, rtol=0)
    if temperature > 0:  # the seed matters, and the draws follow the sampling distribution's log-probs
        others = [policy.act([a], seeds=[s])[2][0].tokens for s in range(20, 26)]
        assert any(not np.array_equal(t, alone.tokens) for t in others)


def test_sampled_rows_decode_as_sample_tokens(policy):
    """`sample_rows` decodes as `PI0FAST.sample_tokens` does, only the draws differ: its recorded log-probs are what
    `action_logp` recomputes in one teacher-forced pass (LOOP's ratio is 1 at unchanged weights), and at T -> 0 it
    picks the greedy ids."""
    policy.temperature = 8.0
    obs = policy.to_observation(policy.prepare([raw_obs(0), raw_obs(1)], [PROMPT] * 2))
    tokens, logp = policy.sample_rows(obs, [1, 2])
    eos_seen = (tokens == EOS_ID).long().cumsum(1)
    through_eos = (eos_seen == 0) | ((eos_seen == 1) & (tokens == EOS_ID))
    recomputed = policy.model.action_logp(obs, tokens, 8.0, policy.max_decoding_steps)
    assert logp[through_eos].min() < -0.5  # not one-hot: real draws
    torch.testing.assert_close(recomputed[through_eos], logp[through_eos], atol=1e-4, rtol=1e-4)
    policy.temperature = 1e-4
    greedy = policy.model.sample_tokens(obs, max_decoding_steps=policy.max_decoding_steps)
    assert torch.equal(policy.sample_rows(obs, [1, 2])[0], greedy)


def test_tokenizer_overlapping_the_fast_ids_is_rejected(assets):
    model = PI0FAST(PI0FASTConfig.variant("pi0_fast_micro", vocab_size=600))
    with pytest.raises(ValueError, match="overlap the FAST ids"):
        LiberoFASTPolicy.build(model, STATS, assets[0], assets[1])


def test_load_policy_reads_a_fast_checkpoint(assets, tmp_path):
    model = PI0FAST(PI0FASTConfig.variant("pi0_fast_micro"))
    fast_dir = assets[1].save_pretrained(tmp_path / "fast")
    model.save_pretrained(
        tmp_path / "ck", norm_stats=STATS, tokenizer_path=assets[0], asset_dirs={FAST_TOKENIZER_DIR: fast_dir}
    )
    policy = load_policy(tmp_path / "ck", temperature=0.5, max_decoding_steps=12)
    assert isinstance(policy, LiberoFASTPolicy) and policy.temperature == 0.5 and policy.max_decoding_steps == 12
    assert policy.transforms.delta_actions and policy.action_tokenizer.vocab_size == assets[1].vocab_size
    model.save_pretrained(tmp_path / "bare", norm_stats=STATS, tokenizer_path=assets[0])
    with pytest.raises(FileNotFoundError, match="bundles no FAST processor"):
        load_policy(tmp_path / "bare")
