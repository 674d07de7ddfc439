"""The CFG flow-matching loss: zero-initialised condition, shared prefix, weighting, masking, 3-label variant."""

from __future__ import annotations

import pytest
import torch
from conftest import random_observation

from pi0_lightning.model.config import PI0Config
from pi0_lightning.model.pi0 import COND_NULL, COND_POSITIVE, PI0
from pi0_lightning.rl.cfg import CFGLossConfig, cfg_loss, masked_fm


@pytest.fixture
def model() -> PI0:
    torch.manual_seed(0)
    return PI0(PI0Config.variant("pi0_tiny", action_horizon=6)).add_cfg_conditions(2)


def batch(model, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    obs = random_observation(cfg, batch_size=b, seed=seed)
    actions = torch.randn(b, cfg.action_horizon, cfg.action_dim, generator=g)
    mask = torch.ones(b, cfg.action_horizon, dtype=torch.bool)
    mask[0, 3:] = False
    return (
        obs,
        actions,
        mask,
        torch.randn(b, cfg.action_horizon, cfg.action_dim, generator=g),
        torch.rand(b, generator=g),
    )


@torch.no_grad()
def test_zero_initialised_condition_leaves_the_model_unchanged(model):
    obs, actions, _, noise, time = batch(model)
    x_t = time[:, None, None] * noise + (1 - time[:, None, None]) * actions
    plain = model.predict_velocity(obs, x_t, time)
    for c in (COND_NULL, COND_POSITIVE):
        torch.testing.assert_close(model.predict_velocity(obs, x_t, time, torch.full((3,), c)), plain)
    torch.testing.assert_close(
        model.sample_actions(obs, noise=noise, guidance=3.0), model.sample_actions(obs, noise=noise)
    )


def test_two_branch_loss_equals_two_separate_forwards(model):
    obs, actions, mask, noise, time = batch(model)
    with torch.no_grad():
        model.cfg_embed.weight.normal_()  # branches must differ for the check to mean something
    adv = torch.tensor([0.8, -0.3, 0.5])
    valid = torch.tensor([True, True, False])
    cfg = CFGLossConfig(alpha=0.1, weighting="advantage", max_advantage=0.6)
    loss, metrics = cfg_loss(model, obs, actions, mask, adv, valid, cfg, noise=noise, time=time)
    t = time[:, None, None]
    x_t, u_t = t * noise + (1 - t) * actions, noise - actions
    fm = {c: masked_fm(model.predict_velocity(obs, x_t, time, torch.full((3,), c)), u_t, mask.float()) for c in (0, 1)}
    # sample 0: weight min(0.8, 0.6); sample 1: A < 0 -> null only; sample 2: padding, ignored
    expected = ((0.6 * fm[1][0] + 0.1 * fm[0][0]) + 0.1 * fm[0][1]) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    assert metrics["num_valid"] == 2 and metrics["frac_positive"] == 0.5
    loss.backward()
    assert model.cfg_embed.weight.grad.abs().sum() > 0 and model.vision.patch_embed.weight.grad is not None


def test_masked_fm_averages_executed_rows_only():
    v = torch.zeros(1, 3, 2)
    u = torch.tensor([[[1.0, 1.0], [3.0, 1.0], [50.0, 50.0]]])
    # rows 0 and 1 executed: mean of (1, 1, 9, 1) = 3; row 2 is padding
    assert masked_fm(v, u, torch.tensor([[1.0, 1.0, 0.0]])).item() == 3.0


def test_all_padding_batch_gives_zero_loss_with_gradients_defined(model):
    obs, actions, mask, noise, time = batch(model)
    loss, _ = cfg_loss(model, obs, actions, mask, torch.ones(3), torch.zeros(3, dtype=torch.bool), CFGLossConfig())
    loss.backward()
    assert loss.item() == 0.0 and model.action_out_proj.weight.grad is not None


def test_three_label_variant_runs_and_drops_labels():
    torch.manual_seed(0)
    model = PI0(PI0Config.variant("pi0_tiny", action_horizon=6)).add_cfg_conditions(3)
    obs, actions, mask, noise, time = batch(model)
    g = torch.Generator().manual_seed(0)
    cfg = CFGLossConfig(variant="three_label", label_dropout=1.0)
    loss, metrics = cfg_loss(
        model, obs, actions, mask, torch.tensor([1.0, -1.0, 0.5]), torch.ones(3, dtype=torch.bool), cfg, generator=g
    )
    assert torch.isfinite(loss) and metrics["frac_null"] == 1.0
    assert CFGLossConfig(variant="three_label").num_conditions == 3


@torch.no_grad()
def test_guidance_combines_null_and_positive_branches(model):
    obs, _, _, noise, _ = batch(model)
    model.cfg_embed.weight.normal_()
    prefix = model.encode_prefix(obs)
    t = torch.full((3,), 0.5)
    v_null = model.denoise_step(prefix, obs.state, noise, t, torch.full((3,), COND_NULL))
    v_pos = model.denoise_step(prefix, obs.state, noise, t, torch.full((3,), COND_POSITIVE))
    guided = model.velocity(model.denoise_context(prefix, obs.state, guidance=2.5), noise, t)
    torch.testing.assert_close(guided, v_null + 2.5 * (v_pos - v_null), rtol=1e-4, atol=1e-5)
    one = model.velocity(model.denoise_context(prefix, obs.state, guidance=1.0), noise, t)
    torch.testing.assert_close(one, v_pos)
    with pytest.raises(ValueError, match="needs a model trained with CFG"):
        PI0(PI0Config.variant("pi0_tiny")).sample_actions(obs, guidance=2.0)
