"""PI0RLModule: the algorithm chosen by model kind, the optimizer schedule, a LOOP training step, export with LoRA
merged, activation checkpointing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_observation

from pi0_lightning.lit.module import OptimConfig, PI0RLModule
from pi0_lightning.model.lora import LoRALinear
from pi0_lightning.model.speed import has_activation_checkpointing


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


def test_export_merges_lora_and_loads_as_plain_pi0(tmp_path):
    from pi0_lightning.envs.spec import identity_norm_stats
    from pi0_lightning.model.pi0 import PI0
    from pi0_lightning.policy.loading import PolicyAssets
    from pi0_lightning.policy.tokenizer import train_small_tokenizer

    m = PI0RLModule(variant="pi0_tiny", trainable="lora", lora_rank=4)
    m.configure_model()
    with torch.no_grad():
        for mod in m.model.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_b.normal_(0, 0.01)
    m.assets = PolicyAssets(
        train_small_tokenizer(["reach the red target"], tmp_path / "t.model"), identity_norm_stats(), False
    )
    obs = random_observation(m.model.config)
    noise = torch.randn(2, m.model.config.action_horizon, 32)
    expected = m.model.sample_actions(obs, noise=noise, num_steps=2)
    loaded = PI0.from_pretrained(m.export_pretrained(tmp_path / "export"))
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    torch.testing.assert_close(loaded.sample_actions(obs, noise=noise, num_steps=2), expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- PI0-FAST (LOOP)


def test_fast_variant_trains_with_loop_and_mismatches_are_clear_errors():
    from pi0_lightning.rl.cfg import CFG
    from pi0_lightning.rl.loop import LOOP

    assert isinstance(PI0RLModule(variant="pi0_fast_micro").algorithm, LOOP)
    assert isinstance(PI0RLModule(variant="pi0_tiny").algorithm, CFG)
    with pytest.raises(ValueError, match="PI0-FAST trains with algorithm"):
        PI0RLModule(variant="pi0_fast_micro", algorithm=CFG())
    with pytest.raises(ValueError, match="got loop for a PI0 model"):
        PI0RLModule(variant="pi0_tiny", algorithm=LOOP())
    with pytest.raises(ValueError, match="rollout_temperature must be > 0"):
        LOOP(rollout_temperature=0.0)
    with pytest.raises(ValueError, match="no action expert"):
        PI0RLModule(variant="pi0_fast_micro", trainable="action_expert").configure_model()


def test_loop_training_step_starts_at_ratio_one_and_moves_toward_positive_tokens():
    """A real batch: reach observations -> FAST rollout policy (T = 1) -> token records -> collate -> LOOP step."""
    from functools import partial

    from pi0_lightning.data.samples import TrainSample, collate
    from pi0_lightning.envs.reach import ReachEnv
    from pi0_lightning.envs.spec import EnvConfig, build_env_spec
    from pi0_lightning.policy.loading import resolve_assets
    from pi0_lightning.rl.loop import LOOP, loop_loss

    # a random model's token distributions are nearly one-hot; a high temperature keeps the log-probs unsaturated
    m = PI0RLModule(variant="pi0_fast_micro", algorithm=LOOP(max_decoding_steps=12, rollout_temperature=8.0))
    m.configure_model()
    spec = build_env_spec(EnvConfig(name="reach"))
    m.assets = resolve_assets(
        m.model, None, instructions=[t.language for t in spec.tasks], env_norm_stats=spec.default_norm_stats
    )
    policy = m.policy()
    env = ReachEnv()
    observations = [env.reset(seed=k, options={"task_id": 0, "init_state": k})[0] for k in range(4)]
    inputs = policy.prepare(observations, ["reach the red target"] * 4)
    model_actions, _, records = policy.act(inputs, seeds=[0, 1, 2, 3])
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
        logp, batch["logp_old"], batch["advantages"], batch["token_mask"], batch["valid"], m.algorithm
    )
    gain = ((logp - batch["logp_old"]) * batch["token_mask"]).sum(1)
    assert metrics["loss"] < loss.item()  # the step lowered the surrogate
    assert gain[0] > 0 and gain[2] > 0 and gain[1] < gain[0]  # positive-advantage tokens became more likely


def test_activation_checkpointing_covers_vision_and_the_chosen_layers():
    m = PI0RLModule(variant="pi0_tiny", activation_checkpointing=True, checkpoint_layers=1)
    m.configure_model()
    assert all(block.checkpointed for block in m.model.vision.blocks)
    assert [layer.checkpointed for layer in m.model.llm.layers] == [True, False]
    off = PI0RLModule(variant="pi0_tiny", checkpoint_layers=1)
    off.configure_model()
    assert not has_activation_checkpointing(off.model)
    obs = random_observation(m.model.config)
    actions = torch.randn(2, m.model.config.action_horizon, m.model.config.action_dim)
    m.model.train()
    m.model(obs, actions).mean().backward()  # checkpointed forward + backward run
    assert m.model.vision.blocks[0].mlp.fc1.weight.grad is not None
