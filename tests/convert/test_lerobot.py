"""openpi-PyTorch / LeRobot layouts: export, import (new, old, prefix-less, lm_head-only) and round trips; a CFG
condition folded in on export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import random_observation
from safetensors.torch import load_file, save_file

from pi0_lightning.convert.cli import main
from pi0_lightning.convert.lerobot import fold_cfg_condition, state_dict_to_lerobot
from pi0_lightning.model.config import PI0Config, tiny_vision
from pi0_lightning.model.pi0 import COND_POSITIVE, PI0

NEW_PREFIX = "model.paligemma_with_expert."


@pytest.fixture(scope="module", params=["pi0_tiny", "pi05_tiny"])
def exported(request, converted, tmp_path_factory):
    name = request.param
    out = tmp_path_factory.mktemp("lerobot") / name
    assert main(["export-lerobot", str(converted(name)), str(out)]) == 0
    return name, converted(name), out


def _same_weights(a_dir, b_dir) -> None:
    a = load_file(str(a_dir / "model.safetensors"))
    b = load_file(str(b_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_export_uses_lerobot_key_names(exported):
    name, ours, out = exported
    keys = set(load_file(str(out / "model.safetensors")))
    assert NEW_PREFIX + "paligemma.model.language_model.layers.0.self_attn.q_proj.weight" in keys
    assert NEW_PREFIX + "paligemma.model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight" in keys
    assert NEW_PREFIX + "paligemma.model.vision_tower.vision_model.embeddings.position_embedding.weight" in keys
    assert NEW_PREFIX + "paligemma.model.multi_modal_projector.linear.weight" in keys
    assert NEW_PREFIX + "gemma_expert.model.layers.3.mlp.down_proj.weight" in keys
    # like the hub files: the tied embedding is stored once, as lm_head
    assert NEW_PREFIX + "paligemma.lm_head.weight" in keys
    assert NEW_PREFIX + "paligemma.model.language_model.embed_tokens.weight" not in keys
    if name == "pi05_tiny":
        assert NEW_PREFIX + "gemma_expert.model.layers.0.input_layernorm.dense.weight" in keys
        assert "model.time_mlp_in.weight" in keys
    else:
        assert NEW_PREFIX + "gemma_expert.model.layers.0.input_layernorm.weight" in keys
        assert "model.state_proj.weight" in keys
    assert len(keys) == len(load_file(str(ours / "model.safetensors")))
    assert json.loads((out / "config.json").read_text())["type"] == ("pi05" if name == "pi05_tiny" else "pi0")


def test_round_trip_is_exact(exported, tmp_path):
    _, ours, out = exported
    assert main(["lerobot", str(out), str(tmp_path / "back")]) == 0
    _same_weights(ours, tmp_path / "back")


def _rewrite(src_dir, dst_dir, rename, config: dict, extra: dict | None = None) -> None:
    dst_dir.mkdir()
    state = {rename(k): v for k, v in load_file(str(src_dir / "model.safetensors")).items()}
    state.update(extra or {})
    save_file(state, str(dst_dir / "model.safetensors"))
    (dst_dir / "config.json").write_text(json.dumps(config))


def _openpi_pytorch_config(name: str) -> dict:
    # what openpi's converter writes: variant names, no head counts
    return {"action_dim": 32, "action_horizon": 50, "paligemma_variant": "dummy", "action_expert_variant": "dummy"}


def test_openpi_pytorch_layout_without_model_prefix(exported, tmp_path):
    name, ours, out = exported
    src = tmp_path / "openpi_pt"
    _rewrite(out, src, lambda k: k.removeprefix("model."), _openpi_pytorch_config(name))
    # SigLIP heads are not in the shapes; the tiny fixtures use 2 (real checkpoints: 16, the default for width 1152)
    argv = ["lerobot", str(src), str(tmp_path / "back"), "--vision-heads", "2"]
    argv += ["--max-token-len", "48" if name == "pi0_tiny" else "200"]
    assert main(argv) == 0
    _same_weights(ours, tmp_path / "back")


def test_old_lerobot_layout(exported, tmp_path):
    name, ours, out = exported
    old = {
        "paligemma.model.language_model.": "paligemma.language_model.model.",
        "paligemma.lm_head.": "paligemma.language_model.lm_head.",
        "paligemma.model.vision_tower.": "paligemma.vision_tower.",
        "paligemma.model.multi_modal_projector.": "paligemma.multi_modal_projector.",
    }

    def rename(k: str) -> str:
        for new, o in old.items():
            k = k.replace(new, o)
        return k

    buffers = {"normalize_inputs.buffer_observation_state.mean": torch.zeros(8)}  # old files carry these
    src = tmp_path / "old"
    _rewrite(out, src, rename, _openpi_pytorch_config(name), buffers)
    argv = ["lerobot", str(src), str(tmp_path / "back"), "--vision-heads", "2"]
    argv += ["--max-token-len", "48" if name == "pi0_tiny" else "200"]
    assert main(argv) == 0
    _same_weights(ours, tmp_path / "back")


@pytest.mark.parametrize("problem", ["missing", "unknown", "shape"])
def test_bad_lerobot_weights_fail_cleanly(exported, tmp_path, capsys, problem):
    _, _, out = exported
    state = load_file(str(out / "model.safetensors"))
    key = NEW_PREFIX + "gemma_expert.model.layers.1.self_attn.o_proj.weight"
    if problem == "missing":
        del state[key]
    elif problem == "unknown":
        state["model.surprise.weight"] = torch.zeros(3)
    else:
        state[key] = torch.zeros(5, 5)
    src = tmp_path / "bad"
    src.mkdir()
    save_file(state, str(src / "model.safetensors"))
    (src / "config.json").write_text((out / "config.json").read_text())
    assert main(["lerobot", str(src), str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert {"missing": "o_proj", "unknown": "surprise", "shape": "o_proj"}[problem] in err
    assert not (tmp_path / "never").exists()


# A policy after RL with CFG: LeRobot has no condition embedding, so the export folds its positive row into a bias


@pytest.fixture(params=["pi0_tiny", "pi05_tiny"])
def cfg_policy(request, tmp_path) -> tuple[PI0, Path]:
    torch.manual_seed(0)
    # small images and prompts: the fold does not depend on the prefix, and two CPU cores are shared
    config = PI0Config.variant(request.param, action_horizon=4, vision=tiny_vision(56), max_token_len=8)
    model = PI0(config).add_cfg_conditions(2).eval()
    with torch.no_grad():
        model.cfg_embed.weight.normal_()  # zero-initialised otherwise: the fold would change nothing
    model.save_pretrained(tmp_path / "ours")
    return model, tmp_path / "ours"


def test_cfg_condition_is_folded_in_as_guidance_one(cfg_policy, tmp_path, capsys):
    model, ours = cfg_policy
    assert main(["export-lerobot", str(ours), str(tmp_path / "lerobot")]) == 0
    assert "w = 1" in capsys.readouterr().err
    exported = load_file(str(tmp_path / "lerobot" / "model.safetensors"))
    assert not any("cfg_embed" in k for k in exported)
    bias = "action_in_proj.bias" if model.config.pi05 else "action_time_mlp_out.bias"
    torch.testing.assert_close(
        exported["model." + bias], model.state_dict()[bias] + model.cfg_embed.weight[COND_POSITIVE].detach()
    )

    assert main(["lerobot", str(tmp_path / "lerobot"), str(tmp_path / "back")]) == 0
    back = PI0.from_pretrained(tmp_path / "back")
    assert back.cfg_embed is None and back.config.num_cfg_conditions == 0
    obs = random_observation(model.config, batch_size=2, seed=1)
    noise = torch.randn(2, 4, model.config.action_dim, generator=torch.Generator().manual_seed(2))
    expected = model.sample_actions(obs, noise=noise, num_steps=3, guidance=1.0)
    torch.testing.assert_close(back.sample_actions(obs, noise=noise, num_steps=3), expected)
    # the condition matters: without it (or with the null one) the policy differs
    assert not torch.allclose(model.sample_actions(obs, noise=noise, num_steps=3), expected, atol=1e-3)
    assert not torch.allclose(model.sample_actions(obs, noise=noise, num_steps=3, guidance=0.0), expected, atol=1e-3)


def test_export_without_cfg_embedding_is_unchanged(tmp_path, capsys):
    torch.manual_seed(0)
    model = PI0(PI0Config.variant("pi0_tiny", action_horizon=4, vision=tiny_vision(56), max_token_len=8))
    state = model.state_dict()
    assert fold_cfg_condition(state, model.config) == (state, model.config)
    model.save_pretrained(tmp_path / "ours")
    assert main(["export-lerobot", str(tmp_path / "ours"), str(tmp_path / "lerobot")]) == 0
    assert capsys.readouterr().err == ""
    exported = load_file(str(tmp_path / "lerobot" / "model.safetensors"))
    expected = state_dict_to_lerobot(state)
    assert exported.keys() == expected.keys()
    for k in expected:
        assert torch.equal(exported[k], expected[k]), k
    assert json.loads((tmp_path / "lerobot" / "config.json").read_text())["pi0_lightning"] == model.config.to_dict()
