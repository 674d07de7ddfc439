"""PI0RLModule model set-up: trainable parts, LoRA (identity at init, mergeable), the optimizer schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_observation

from pi0_lightning.lit.module import OptimConfig, PI0RLModule
from pi0_lightning.model.lora import LoRALinear, merge_lora


def trainable(module: PI0RLModule) -> set[str]:
    return {n for n, p in module.model.named_parameters() if p.requires_grad}


def test_full_and_frozen_vision():
    full = PI0RLModule(variant="pi0_tiny")
    full.configure_model()
    assert all(p.requires_grad for p in full.model.parameters())
    assert full.model.cfg_embed is not None and full.model.cfg_embed.weight.abs().sum() == 0
    fv = PI0RLModule(variant="pi0_tiny", trainable="frozen_vision")
    fv.configure_model()
    names = trainable(fv)
    assert not any(n.startswith("vision.") for n in names) and "llm.layers.0.experts.0.q_proj.weight" in names


def test_action_expert_only():
    m = PI0RLModule(variant="pi0_tiny", trainable="action_expert")
    m.configure_model()
    names = trainable(m)
    assert "llm.layers.1.experts.1.mlp.up_proj.weight" in names and "llm.norms.1.weight" in names
    assert "cfg_embed.weight" in names and "action_out_proj.weight" in names and "state_proj.weight" in names
    assert not any(n.startswith(("vision.", "llm.embed_tokens")) or ".experts.0." in n for n in names)


def test_lora_starts_as_the_base_model_and_merges_back():
    torch.manual_seed(0)
    base = PI0RLModule(variant="pi0_tiny", trainable="full")
    base.configure_model()
    lora = PI0RLModule(variant="pi0_tiny", trainable="lora", lora_rank=4)
    lora.configure_model()
    lora.model.load_state_dict(base.model.state_dict(), strict=False)
    assert isinstance(lora.model.llm.layers[0].experts[1].q_proj, LoRALinear)
    names = trainable(lora)
    assert all("lora_" in n or not n.startswith("llm.") for n in names) and any("lora_a" in n for n in names)
    obs = random_observation(base.model.config)
    noise = torch.randn(2, base.model.config.action_horizon, base.model.config.action_dim)
    a = base.model.sample_actions(obs, noise=noise, num_steps=2)
    torch.testing.assert_close(lora.model.sample_actions(obs, noise=noise, num_steps=2), a)  # B = 0 at init
    with torch.no_grad():
        for mod in lora.model.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_b.normal_(0, 0.01)
    adapted = lora.model.sample_actions(obs, noise=noise, num_steps=2)
    assert merge_lora(lora.model) > 0
    torch.testing.assert_close(lora.model.sample_actions(obs, noise=noise, num_steps=2), adapted, atol=1e-4, rtol=1e-4)


def test_warmup_then_cosine_to_min_lr():
    m = PI0RLModule(variant="pi0_tiny", optim=OptimConfig(lr=1.0, warmup_steps=4, decay_steps=10, min_lr=0.1))
    m.configure_model()
    sched = m.configure_optimizers()["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.2) and lrs[3] == pytest.approx(0.8) and lrs[4] == pytest.approx(1.0)
    assert lrs[14] == pytest.approx(0.1) and lrs[19] == pytest.approx(0.1)


def test_unknown_trainable_mode_rejected():
    with pytest.raises(ValueError, match="trainable must be"):
        PI0RLModule(variant="pi0_tiny", trainable="half").configure_model()


def test_export_merges_lora_and_loads_as_plain_pi0(tmp_path):
    from pi0_lightning.envs.spec import identity_norm_stats
    from pi0_lightning.model.pi0 import PI0
    from pi0_lightning.policy.tokenizer import train_small_tokenizer

    m = PI0RLModule(variant="pi0_tiny", trainable="lora", lora_rank=4)
    m.configure_model()
    with torch.no_grad():
        for mod in m.model.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_b.normal_(0, 0.01)
    m.norm_stats = identity_norm_stats()
    m.tokenizer_path = train_small_tokenizer(["reach the red target"], tmp_path / "t.model")
    obs = random_observation(m.model.config)
    noise = torch.randn(2, m.model.config.action_horizon, 32)
    expected = m.model.sample_actions(obs, noise=noise, num_steps=2)
    loaded = PI0.from_pretrained(m.export_pretrained(tmp_path / "export"))
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    torch.testing.assert_close(loaded.sample_actions(obs, noise=noise, num_steps=2), expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- PI0-FAST (LOOP)


def test_fast_variant_trains_with_loop_and_mismatches_are_clear_errors():
    from pi0_lightning.rl.loop import LOOPLossConfig
    from pi0_lightning.rl.losses import CFGLossConfig

    assert isinstance(PI0RLModule(variant="pi0_fast_micro").loss_config, LOOPLossConfig)
    assert isinstance(PI0RLModule(variant="pi0_tiny").loss_config, CFGLossConfig)
    with pytest.raises(ValueError, match="PI0-FAST trains with loss"):
        PI0RLModule(variant="pi0_fast_micro", loss=CFGLossConfig())
    with pytest.raises(ValueError, match="PI0 / PI0.5 with loss"):
        PI0RLModule(variant="pi0_tiny", loss=LOOPLossConfig())
    with pytest.raises(ValueError, match="rollout_temperature must be > 0"):
        PI0RLModule(variant="pi0_fast_micro", rollout_temperature=0.0)
    with pytest.raises(ValueError, match="no action expert"):
        PI0RLModule(variant="pi0_fast_micro", trainable="action_expert").configure_model()


def test_loop_training_step_starts_at_ratio_one_and_moves_toward_positive_tokens():
    """A real batch: reach observations -> FAST rollout policy (T = 1) -> token records -> collate -> LOOP step."""
    from functools import partial
    from types import SimpleNamespace

    from pi0_lightning.data.samples import TrainSample, collate
    from pi0_lightning.envs.reach import ReachEnv
    from pi0_lightning.envs.spec import EnvConfig, build_env_spec
    from pi0_lightning.rl.loop import loop_loss

    # a random model's token distributions are nearly one-hot; a high temperature keeps the log-probs unsaturated
    m = PI0RLModule(variant="pi0_fast_micro", max_decoding_steps=12, rollout_temperature=8.0)
    m.configure_model()
    m._resolve_policy_assets(SimpleNamespace(spec=build_env_spec(EnvConfig(name="reach"))))
    policy = m.rollout_policy()
    env = ReachEnv()
    observations = [env.reset(seed=k, options={"task_id": 0, "init_state": k})[0] for k in range(4)]
    inputs = policy.prepare(observations, ["reach the red target"] * 4)
    model_actions, _, records = policy.act(inputs, seed=0)
    samples = [
        TrainSample(x, a, np.ones(10, bool), adv, True, 0, r)
        for x, a, adv, r in zip(inputs, model_actions, [1.0, -1.0, 1.0, -1.0], records, strict=True)
    ]
    batch = collate(samples, partial(policy.to_observation, device="cpu"))
    logged = {}
    m.log = lambda name, value, **kw: logged.__setitem__(name, float(torch.as_tensor(value).detach()))
    m.model.train()
    loss = m.training_step(batch, 0)
    assert logged["train/ratio_mean"] == pytest.approx(1.0, abs=1e-5) and logged["train/clip_frac"] == 0.0
    opt = torch.optim.SGD(m.model.parameters(), lr=0.05)
    opt.zero_grad()
    loss.backward()
    opt.step()
    logp = m.model.action_logp(batch["obs"], batch["tokens"], 8.0, 12)
    _, metrics = loop_loss(
        logp, batch["logp_old"], batch["advantages"], batch["token_mask"], batch["valid"], m.loss_config
    )
    gain = ((logp - batch["logp_old"]) * batch["token_mask"]).sum(1)
    assert metrics["loss"] < loss.item()  # the step lowered the surrogate
    assert gain[0] > 0 and gain[2] > 0 and gain[1] < gain[0]  # positive-advantage tokens became more likely


def test_activation_checkpointing_covers_vision_and_the_chosen_layers():
    m = PI0RLModule(variant="pi0_tiny", activation_checkpointing=True, checkpoint_layers=1)
    m.configure_model()
    assert m.model.vision.gradient_checkpointing and m.model.llm.gradient_checkpointing == 1
    assert [m.model.llm._checkpointed(i) for i in range(2)] == [True, False]
    off = PI0RLModule(variant="pi0_tiny", checkpoint_layers=1)
    off.configure_model()
    assert not off.model.vision.gradient_checkpointing and off.model.llm.gradient_checkpointing is False
    obs = random_observation(m.model.config)
    actions = torch.randn(2, m.model.config.action_horizon, m.model.config.action_dim)
    m.model.train()
    m.model(obs, actions).mean().backward()  # checkpointed forward + backward run
    assert m.model.vision.blocks[0].mlp.fc1.weight.grad is not None
