"""Reference attention (grouped-query heads, finite masks, fully masked rows), and installed speed paths that equal
the reference layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pi0_lightning.model import gemma
from pi0_lightning.model.fused import FusedWeight
from pi0_lightning.model.gemma import JointLayer
from pi0_lightning.model.speed import SpeedConfig, apply_speed_paths, disabled, has_activation_checkpointing


def test_small_attention_matches_sdpa():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 5, 16, generator=g)
    k, v = torch.randn(2, 2, 7, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g)
    allowed = torch.rand(2, 5, 7, generator=g) > 0.3
    allowed[1, 2] = False  # a fully masked row: openpi's finite mask gives it a uniform softmax, not NaN
    mask = gemma.additive_mask(allowed, torch.float32)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    with torch.no_grad():
        torch.testing.assert_close(gemma.attention(q, k, v, mask, 2), expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(gemma.attention(q, k, v, mask, 2)[1, :, 2], v[1].mean(1).repeat_interleave(4, 0))


def test_training_and_large_inputs_use_sdpa(monkeypatch):
    calls = []
    monkeypatch.setattr(gemma.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or a[0])
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4)
    mask = torch.zeros(1, 1, 3, 3)
    gemma.attention(q, k, k, mask, 1)  # grad enabled: SDPA (memory-efficient backward)
    with torch.no_grad():
        monkeypatch.setattr(gemma, "SMALL_ATTENTION", 10)
        gemma.attention(q, k, k, mask, 1)  # over the size limit: SDPA
    assert len(calls) == 2


def _tiny(seed: int = 0, variant: str = "pi0_tiny"):
    from conftest import random_observation

    from pi0_lightning.model.config import PI0Config
    from pi0_lightning.model.pi0 import PI0

    torch.manual_seed(seed)
    model = PI0(PI0Config.variant(variant, action_horizon=6)).eval()
    return model, random_observation(model.config), torch.randn(2, 6, 32)


def _sample(model, obs, noise):
    return model.sample_actions(obs, noise=noise, num_steps=3)


@pytest.mark.parametrize("variant", ["pi0_tiny", "pi05_tiny"])
def test_installed_paths_equal_the_reference_layers(variant):
    """On the CPU the installed layers run the reference arithmetic (views instead of copies, RoPE in one pass), up
    to the stacked GEMMs' float rounding."""
    model, obs, noise = _tiny(variant=variant)
    reference = _sample(model, obs, noise)
    apply_speed_paths(model, SpeedConfig(fused_projections=False))
    assert isinstance(model.llm.layers[0], JointLayer) and type(model.llm.layers[0]) is not JointLayer
    torch.testing.assert_close(_sample(model, obs, noise), reference)
    apply_speed_paths(model)
    torch.testing.assert_close(_sample(model, obs, noise), reference, atol=1e-6, rtol=1e-6)
    assert [k for k in model.state_dict()] == [k for k in _tiny(variant=variant)[0].state_dict()]


@pytest.mark.parametrize("variant", ["pi0_tiny", "pi05_tiny"])
def test_fused_projections_equal_separate_ones(variant):
    model, obs, noise = _tiny(variant=variant)
    separate = _sample(model, obs, noise)
    apply_speed_paths(model)
    assert sum(layer.stack_projections((0, 1), fold_norms=True) for layer in model.llm.layers) == 2 * len(
        model.llm.layers
    )
    torch.testing.assert_close(_sample(model, obs, noise), separate, atol=1e-6, rtol=1e-6)


def test_fused_projections_follow_parameter_updates():
    model, obs, noise = _tiny()
    with torch.inference_mode():  # built under inference mode, refreshed in place outside it later
        apply_speed_paths(model)
        before = _sample(model, obs, noise)
    stacked = model.llm.layers[0].stacks[1].qkv.weight
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    model(obs, torch.randn(2, 6, 32)).mean().backward()
    opt.step()
    model.eval()
    after = _sample(model, obs, noise)
    assert model.llm.layers[0].stacks[1].qkv.weight is stacked  # refreshed in place (CUDA graphs keep it)
    model.llm.load_state_dict({k: v + 0.01 for k, v in model.llm.state_dict().items()})
    loaded = _sample(model, obs, noise)
    apply_speed_paths(model, SpeedConfig(fused_projections=False))
    assert all(s is None for s in model.llm.layers[0].stacks)  # dropped: memory freed
    torch.testing.assert_close(loaded, _sample(model, obs, noise), atol=1e-6, rtol=1e-6)
    assert (after - before).abs().max() > 1e-3 and (loaded - after).abs().max() > 1e-3


def test_fused_projections_rebuilt_after_a_dtype_change():
    model, obs, noise = _tiny()
    apply_speed_paths(model)
    _sample(model, obs, noise)
    model.apply_dtype_policy("bfloat16")  # re-allocates the parameters: the stacks must follow, not go stale
    out = _sample(model, obs, noise)
    assert model.llm.layers[0].stacks[1].qkv.weight.dtype == torch.bfloat16
    with disabled(model, "fused_projections"):
        torch.testing.assert_close(out, _sample(model, obs, noise))


def test_training_uses_the_separate_parameters(monkeypatch):
    model, obs, _ = _tiny()
    apply_speed_paths(model)
    monkeypatch.setattr(FusedWeight, "__call__", lambda *a: pytest.fail("fused weights used with grad"))
    model.train()
    model(obs, torch.randn(2, 6, 32)).mean().backward()
    assert model.llm.layers[0].experts[1].q_proj.weight.grad.abs().sum() > 0


def test_lora_layers_are_not_fused():
    from pi0_lightning.model.lora import apply_lora

    model, obs, noise = _tiny()
    apply_speed_paths(model)
    apply_lora(model.llm.layers[0].experts[1], rank=2)  # after stacking: the stale stack must not be used
    torch.nn.init.normal_(model.llm.layers[0].experts[1].q_proj.lora_b)
    fused_out = _sample(model, obs, noise)
    assert model.llm.layers[0].stacks[1] is None and model.llm.layers[1].stacks[1] is not None
    with disabled(model, "fused_projections"):
        torch.testing.assert_close(fused_out, _sample(model, obs, noise), atol=1e-6, rtol=1e-6)
    assert model.llm.layers[0].stack_projections((1,), fold_norms=True) == 0


def test_activation_checkpointing_first_layers_and_vision():
    model, _, _ = _tiny()
    apply_speed_paths(model, SpeedConfig(activation_checkpointing=True, checkpoint_layers=1))
    assert [layer.checkpointed for layer in model.llm.layers] == [True] + [False] * (len(model.llm.layers) - 1)
    assert all(block.checkpointed for block in model.vision.blocks) and has_activation_checkpointing(model)
    apply_speed_paths(model, SpeedConfig())
    assert not has_activation_checkpointing(model)
