"""Unit tests of the PI0 / PI0.5 model on tiny random configs (no fixtures needed)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import random_observation

from pi0_lightning.checkpoint import build_model
from pi0_lightning.model.config import PI0Config
from pi0_lightning.model.pi0 import PI0, euler_times, make_attn_mask, posemb_sincos, sample_time
from pi0_lightning.model.speed import compile_denoise_step, set_activation_checkpointing


@pytest.fixture(params=["pi0_tiny", "pi05_tiny"])
def model(request) -> PI0:
    torch.manual_seed(0)
    m = PI0(PI0Config.variant(request.param, action_horizon=8))
    # norms and adaRMS start at zero in openpi; give them values so their code paths are exercised
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def test_param_counts_match_openpi():
    # openpi's nnx.eval_shape counts (../shared/reference/openpi_facts.md §2.5); built on the meta device
    expected = {"pi0": 3_238_048_528, "pi05": 3_353_433_872, "pi0_dummy": 429_337_808, "pi05_dummy": 429_443_344}
    for name, count in expected.items():
        m = build_model(PI0Config.variant(name))
        assert sum(p.numel() for p in m.parameters()) == count, name


def test_make_attn_mask_block_causal():
    input_mask = torch.tensor([[True, True, True, False, True, True]])
    ar = torch.tensor([0, 0, 0, 0, 1, 0])
    m = make_attn_mask(input_mask, ar)[0]
    assert m[0, :3].all() and not m[0, 4:].any()  # prefix never sees the suffix
    assert m[4, :3].all() and m[4, 4] and m[4, 5] and m[5, 4]  # suffix block sees prefix and itself
    assert not m[:, 3].any() and not m[3].any()  # padding is invisible and sees nothing


def test_posemb_sincos_sin_first():
    e = posemb_sincos(torch.tensor([0.0, 0.5]), 8)
    assert e.shape == (2, 8) and e.dtype == torch.float32
    assert torch.equal(e[0, :4], torch.zeros(4)) and torch.equal(e[0, 4:], torch.ones(4))
    # the first frequency has period min_period = 4e-3
    assert torch.isclose(e[1, 0], torch.sin(torch.tensor(0.5 * 2 * torch.pi / 4e-3, dtype=torch.float64)).float())


def test_sample_time_distribution():
    g = torch.Generator().manual_seed(0)
    t = sample_time(200_000, generator=g)
    assert t.min() >= 0.001 and t.max() <= 1.0
    # Beta(1.5, 1) has mean 0.6 and P(b < 0.5) = 0.5**1.5
    assert abs(t.mean().item() - (0.6 * 0.999 + 0.001)) < 3e-3
    assert abs((t < 0.5 * 0.999 + 0.001).float().mean().item() - 0.5**1.5) < 3e-3


def test_forward_is_unreduced_and_differentiable(model):
    cfg = model.config
    obs = random_observation(cfg)
    actions = torch.randn(2, cfg.action_horizon, cfg.action_dim)
    model.train()
    loss = model(obs, actions)
    assert loss.shape == (2, cfg.action_horizon, cfg.action_dim)
    loss.mean().backward()
    assert model.action_in_proj.weight.grad is not None
    assert model.vision.patch_embed.weight.grad is not None


@torch.no_grad()
def test_cached_prefix_equals_joint_forward(model):
    cfg = model.config
    obs = random_observation(cfg)
    x_t = torch.randn(2, cfg.action_horizon, cfg.action_dim)
    time = torch.tensor([0.3, 0.9])
    joint = model.predict_velocity(obs, x_t, time)
    cached = model.denoise_step(model.encode_prefix(obs), obs.state, x_t, time)
    torch.testing.assert_close(cached, joint, atol=1e-5, rtol=1e-5)


def test_prefix_pass_skips_the_last_layers_unread_work(model):
    """encode_prefix stops the last layer after its keys and values: the same cache bit for bit as the full pass, and
    with grad the cache still reaches every parameter a loss through it needs (none of the skipped ones)."""
    cfg = model.config
    obs = random_observation(cfg)
    tokens, mask, ar = model.embed_prefix(obs)
    positions = torch.cumsum(mask.long(), dim=1) - 1
    attn = make_attn_mask(mask, ar)
    with torch.no_grad():
        _, full = model.llm([tokens, None], positions, attn, return_kv=True)
        hs, cache = model.llm([tokens, None], positions, attn, return_kv=True, cache_only=True)
        assert hs == [None, None] and len(cache) == len(full) == cfg.paligemma.depth
        for (k, v), (k_full, v_full) in zip(cache, full, strict=True):
            assert torch.equal(k, k_full) and torch.equal(v, v_full)
        assert torch.equal(model.encode_prefix(obs).kv[-1][0], full[-1][0])
    with pytest.raises(ValueError, match="cache_only"):
        model.llm([tokens, None], positions, attn, cache_only=True)
    last = model.llm.layers[-1].experts[0]
    model.train()
    sum(k.sum() + v.sum() for k, v in model.encode_prefix(obs).kv).backward()
    assert last.k_proj.weight.grad is not None
    assert last.q_proj.weight.grad is None and last.mlp.down_proj.weight.grad is None


@torch.no_grad()
def test_masked_camera_and_padding_have_no_effect(model):
    cfg = model.config
    obs = random_observation(cfg)
    noise = torch.randn(2, cfg.action_horizon, cfg.action_dim)
    a = model.sample_actions(obs, noise=noise, num_steps=3)
    obs.images["right_wrist_0_rgb"] = torch.rand_like(obs.images["right_wrist_0_rgb"])  # masked camera
    obs.tokenized_prompt = torch.where(obs.tokenized_prompt_mask, obs.tokenized_prompt, 7)  # padding content
    b = model.sample_actions(obs, noise=noise, num_steps=3)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_euler_times_follow_openpi_float32_loop():
    assert euler_times(10) == pytest.approx([1.0 - 0.1 * i for i in range(10)], abs=1e-6)
    assert len(euler_times(3)) == 3 and euler_times(1) == [1.0]


@torch.no_grad()
@pytest.mark.parametrize("guidance", [None, 2.5])
def test_sampler_equals_step_by_step_denoising(model, guidance):
    """sample_actions computes the steps' shared inputs once (DenoiseContext, batched time embeddings) and, with
    `speed.compile_denoise_step`, runs the work around the layers compiled: same actions as Euler steps of
    `velocity`."""
    cfg = model.config
    obs = random_observation(cfg, batch_size=2)
    noise = torch.randn(2, cfg.action_horizon, cfg.action_dim)
    if guidance is not None:
        model.add_cfg_conditions(2).cfg_embed.weight.normal_()
    ctx = model.denoise_context(model.encode_prefix(obs), obs.state, guidance=guidance)
    x = noise
    for t in euler_times(3):
        x = x + (-1 / 3) * model.velocity(ctx, x, torch.full((2,), t))
    torch.testing.assert_close(model.sample_actions(obs, noise=noise, num_steps=3, guidance=guidance), x)
    compile_denoise_step(model)
    try:
        compiled = model.sample_actions(obs, noise=noise, num_steps=3, guidance=guidance)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, x, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_sampling_is_deterministic_given_noise_and_batch_independent(model):
    cfg = model.config
    obs = random_observation(cfg, batch_size=3)
    noise = torch.randn(3, cfg.action_horizon, cfg.action_dim)
    full = model.sample_actions(obs, noise=noise, num_steps=2)
    one = model.sample_actions(obs.index(slice(1, 2)), noise=noise[1:2], num_steps=2)
    torch.testing.assert_close(full[1:2], one, atol=1e-5, rtol=1e-5)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(
        model.sample_actions(obs, num_steps=2, generator=g1), model.sample_actions(obs, num_steps=2, generator=g2)
    )


def test_bfloat16_policy_keeps_float32_islands(model):
    model.apply_dtype_policy("bfloat16")
    dt = {n: p.dtype for n, p in model.named_parameters()}
    assert dt["vision.patch_embed.weight"] == torch.float32
    assert dt["vision.pos_embed"] == torch.float32
    assert dt["action_in_proj.weight"] == torch.float32 and dt["action_out_proj.weight"] == torch.float32
    assert dt["vision.blocks.0.norm1.weight"] == torch.float32
    assert all(dtype == torch.float32 for n, dtype in dt.items() if ".attn_norm." in n or "llm.norms" in n)
    assert dt["llm.layers.0.experts.1.q_proj.weight"] == torch.bfloat16
    assert dt["vision.blocks.0.attn.q_proj.weight"] == torch.bfloat16
    assert dt["llm.embed_tokens.weight"] == torch.bfloat16
    obs = random_observation(model.config)
    out = model.sample_actions(obs, num_steps=2)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_activation_checkpointing_gives_same_gradients(model):
    cfg = model.config
    obs = random_observation(cfg)
    actions = torch.randn(2, cfg.action_horizon, cfg.action_dim)
    noise, time = torch.randn_like(actions), torch.tensor([0.2, 0.7])
    model.train()

    def grads():
        model.zero_grad()
        model(obs, actions, noise=noise, time=time).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    set_activation_checkpointing(model, True)
    ckpt = grads()
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-5)


def test_save_and_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt", norm_stats={"norm_stats": {}})
    loaded = PI0.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_config_rejects_mismatched_experts():
    cfg = PI0Config.variant("pi0_tiny")
    with pytest.raises(ValueError, match="share depth"):
        PI0Config(paligemma=cfg.paligemma, action_expert=dataclasses.replace(cfg.action_expert, depth=3))
    with pytest.raises(ValueError, match="unknown PI0 variant"):
        PI0Config.variant("pi7")
