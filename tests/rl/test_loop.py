"""LOOP's PPO clipped-ratio loss with hand-computed numbers."""

from __future__ import annotations

import math

import torch

from pi0_lightning.rl.loop import LOOPLossConfig, loop_loss


def run(logp_new, logp_old, adv, mask=None, valid=None, cfg=None):
    logp_new = torch.tensor(logp_new, requires_grad=True)
    logp_old = torch.tensor(logp_old)
    mask = torch.ones_like(logp_old, dtype=torch.bool) if mask is None else torch.tensor(mask)
    valid = torch.ones(logp_old.shape[0], dtype=torch.bool) if valid is None else torch.tensor(valid)
    loss, metrics = loop_loss(logp_new, logp_old, torch.tensor(adv), mask, valid, cfg or LOOPLossConfig())
    loss.backward()
    return loss.item(), logp_new.grad, metrics


def test_on_policy_is_minus_mean_advantage_with_full_gradient():
    loss, grad, m = run([[-1.0, -2.0]], [[-1.0, -2.0]], [0.5])
    assert math.isclose(loss, -0.5, rel_tol=1e-6) and m["ratio_mean"] == 1.0 and m["clip_frac"] == 0
    assert torch.allclose(grad, torch.tensor([[-0.25, -0.25]]))  # d(-A r)/dlogp = -A r / n_tokens


def test_clipping_by_hand():
    # token 0: r = e^0.5 = 1.6487 > 1.2 with A > 0 -> clipped at 1.2 (no gradient);
    # token 1: r = e^-0.5 = 0.6065 < 0.8 with A > 0 -> unclipped -A r is larger -> kept, gradient flows
    loss, grad, m = run([[0.5, -0.5]], [[0.0, 0.0]], [1.0])
    expected = (-1.2 + -math.exp(-0.5)) / 2
    assert math.isclose(loss, expected, rel_tol=1e-6)
    assert grad[0, 0] == 0 and grad[0, 1] < 0 and math.isclose(m["clip_frac"].item(), 0.5)


def test_negative_advantage_and_asymmetric_clip():
    # A < 0, r = e^0.5: -A r = 1.6487 vs -A clip(r, 0.8, 1.28) = 1.28 -> max keeps the unclipped (pessimistic) one
    loss, _, _ = run([[0.5]], [[0.0]], [-1.0], cfg=LOOPLossConfig(clip_low=0.2, clip_high=0.28))
    assert math.isclose(loss, math.exp(0.5), rel_tol=1e-6)
    # A > 0 with clip-higher: r = e^0.5 clipped at 1.28 instead of 1.2
    loss, _, _ = run([[0.5]], [[0.0]], [1.0], cfg=LOOPLossConfig(clip_low=0.2, clip_high=0.28))
    assert math.isclose(loss, -1.28, rel_tol=1e-6)


def test_masked_tokens_and_padded_samples_are_ignored():
    loss, grad, m = run(
        [[0.0, 9.0], [0.0, 0.0]],
        [[0.0, 0.0], [0.0, 0.0]],
        [1.0, 5.0],
        mask=[[True, False], [True, True]],
        valid=[True, False],
    )
    assert math.isclose(loss, -1.0, rel_tol=1e-6) and m["num_tokens"] == 1
    assert grad[0, 1] == 0 and (grad[1] == 0).all()
