"""Trainable modes: full, frozen vision, action expert only, LoRA (identity at init, mergeable)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_observation

from pi0_lightning.model.config import PI0Config
from pi0_lightning.model.lora import LoRALinear, merge_lora
from pi0_lightning.model.pi0 import PI0
from pi0_lightning.model.trainable import set_trainable


def model(mode: str = "full", **kw) -> PI0:
    torch.manual_seed(0)  # the same base weights for every mode
    m = PI0(PI0Config.variant("pi0_tiny")).add_cfg_conditions(2)
    set_trainable(m, mode, **kw)
    return m


def trainable(m) -> set[str]:
    return {n for n, p in m.named_parameters() if p.requires_grad}


def test_full_and_frozen_vision():
    full = model()
    assert all(p.requires_grad for p in full.parameters())
    assert full.cfg_embed is not None and full.cfg_embed.weight.abs().sum() == 0
    names = trainable(model("frozen_vision"))
    assert not any(n.startswith("vision.") for n in names) and "llm.layers.0.experts.0.q_proj.weight" in names


def test_action_expert_only():
    names = trainable(model("action_expert"))
    assert "llm.layers.1.experts.1.mlp.up_proj.weight" in names and "llm.norms.1.weight" in names
    assert "cfg_embed.weight" in names and "action_out_proj.weight" in names and "state_proj.weight" in names
    assert not any(n.startswith(("vision.", "llm.embed_tokens")) or ".experts.0." in n for n in names)


def test_lora_starts_as_the_base_model_and_merges_back():
    torch.manual_seed(0)
    base = model()
    lora = model("lora", lora_rank=4)
    lora.load_state_dict(base.state_dict(), strict=False)
    assert isinstance(lora.llm.layers[0].experts[1].q_proj, LoRALinear)
    names = trainable(lora)
    assert all("lora_" in n or not n.startswith("llm.") for n in names) and any("lora_a" in n for n in names)
    obs = random_observation(base.config)
    noise = torch.randn(2, base.config.action_horizon, base.config.action_dim)
    a = base.sample_actions(obs, noise=noise, num_steps=2)
    torch.testing.assert_close(lora.sample_actions(obs, noise=noise, num_steps=2), a)  # B = 0 at init
    with torch.no_grad():
        for mod in lora.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_b.normal_(0, 0.01)
    adapted = lora.sample_actions(obs, noise=noise, num_steps=2)
    assert merge_lora(lora) > 0
    torch.testing.assert_close(lora.sample_actions(obs, noise=noise, num_steps=2), adapted, atol=1e-4, rtol=1e-4)


def test_unknown_trainable_mode_rejected():
    with pytest.raises(ValueError, match="trainable must be"):
        model("half")


def test_pi0_fast_has_no_action_expert():
    from pi0_lightning.model.pi0_fast import PI0FAST, PI0FASTConfig

    with pytest.raises(ValueError, match="no action expert"):
        set_trainable(PI0FAST(PI0FASTConfig.variant("pi0_fast_micro")), "action_expert")
