"""Parity with openpi's JAX PI0 / PI0.5 on the tiny reference fixtures (the contract of the model).

Each fixture is converted with `pi0-convert openpi`, loaded with `PI0.from_pretrained`, and compared with arrays
computed by openpi's own code (see ../shared/fixtures/openpi/README.md).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import observation_from_reference
from safetensors.torch import load_file

from pi0_lightning.model.config import IMAGE_KEYS
from pi0_lightning.model.pi0 import PI0, make_attn_mask

FIXTURES = ["pi0_tiny", "pi05_tiny"]
TOL = 1e-4


@pytest.fixture(scope="module", params=FIXTURES)
def case(request, openpi_fixtures, converted):
    name = request.param
    ref = np.load(openpi_fixtures / name / "reference.npz")
    model = PI0.from_pretrained(converted(name), dtype="float32")
    return name, model, ref, observation_from_reference(ref)


def t(ref, key: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(ref[key]))


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def test_image_tokens(case):
    _, model, ref, obs = case
    assert max_err(model.vision(obs.images["base_0_rgb"]), t(ref, "img_tokens_base_0_rgb")) <= TOL


@torch.no_grad()
def test_prefix_embeddings_masks_positions(case):
    _, model, ref, obs = case
    tokens, input_mask, ar_mask = model.embed_prefix(obs)
    assert max_err(tokens, t(ref, "prefix_embs")) <= TOL
    assert torch.equal(input_mask, t(ref, "prefix_input_mask"))
    assert torch.equal(ar_mask, t(ref, "prefix_ar_mask"))
    assert torch.equal(make_attn_mask(input_mask, ar_mask), t(ref, "prefix_attn_mask"))
    assert torch.equal(torch.cumsum(input_mask.long(), 1) - 1, t(ref, "prefix_positions").long())


@torch.no_grad()
def test_suffix_embeddings_and_training_masks(case):
    name, model, ref, obs = case
    prefix, p_mask, p_ar = model.embed_prefix(obs)
    suffix, s_mask, s_ar, cond = model.embed_suffix(obs.state, t(ref, "train_x_t"), t(ref, "train_time"))
    assert max_err(suffix, t(ref, "train_suffix_embs")) <= TOL
    assert torch.equal(s_mask, t(ref, "suffix_input_mask"))
    assert torch.equal(s_ar, t(ref, "suffix_ar_mask"))
    if name == "pi05_tiny":
        assert max_err(cond, t(ref, "train_adarms_cond")) <= TOL
    else:
        assert cond is None
    full = torch.cat([p_mask, s_mask], 1)
    assert torch.equal(make_attn_mask(full, torch.cat([p_ar, s_ar])), t(ref, "train_attn_mask"))
    assert torch.equal(torch.cumsum(full.long(), 1) - 1, t(ref, "train_positions").long())


@torch.no_grad()
def test_training_velocity_and_loss(case):
    _, model, ref, obs = case
    v_t = model.predict_velocity(obs, t(ref, "train_x_t"), t(ref, "train_time"))
    assert max_err(v_t, t(ref, "train_v_t")) <= TOL
    loss = model(obs, t(ref, "train_actions"), noise=t(ref, "train_noise"), time=t(ref, "train_time"))
    assert loss.shape == (3, 50, 32)
    # openpi's compute_loss averages over the action dims; ours is unreduced
    assert max_err(loss.mean(-1), t(ref, "train_loss")) <= TOL


@torch.no_grad()
def test_sampling_steps_and_actions(case):
    _, model, ref, obs = case
    actions = model.sample_actions(obs, noise=t(ref, "noise"), num_steps=10)
    assert actions.shape == (3, 50, 32)
    assert max_err(actions, t(ref, "actions_float32")) <= TOL
    # the first Euler step's velocity through the prefix KV cache
    prefix = model.encode_prefix(obs)
    v0 = model.denoise_step(prefix, obs.state, t(ref, "noise"), torch.ones(3))
    assert max_err(v0, t(ref, "sample_v_t")[0]) <= TOL


@torch.no_grad()
def test_sampling_masks_and_positions(case):
    _, model, ref, obs = case
    _, p_mask, _ = model.embed_prefix(obs)
    _, s_mask, s_ar, _ = model.embed_suffix(obs.state, t(ref, "noise"), torch.ones(3))
    s = s_mask.shape[1]
    mask = torch.cat([p_mask[:, None].expand(-1, s, -1), make_attn_mask(s_mask, s_ar)], 2)
    assert torch.equal(mask, t(ref, "sample_suffix_attn_mask"))
    positions = p_mask.sum(-1, keepdim=True) + torch.cumsum(s_mask.long(), 1) - 1
    assert torch.equal(positions, t(ref, "sample_suffix_positions").long())


@torch.no_grad()
def test_bfloat16_matches_openpi_bfloat16(case, converted):
    name, _, ref, obs = case
    model = PI0.from_pretrained(converted(name), dtype="bfloat16")
    assert model.llm.layers[0].experts[0].q_proj.weight.dtype == torch.bfloat16
    actions = model.sample_actions(obs, noise=t(ref, "noise"))
    expected = t(ref, "actions_bfloat16")
    rel_l2 = ((actions - expected).norm() / expected.norm()).item()
    assert rel_l2 <= 3e-2


def test_value_layout_converts_to_identical_tensors(openpi_fixtures, converted, tmp_path):
    from pi0_lightning.convert.cli import main

    out = tmp_path / "value"
    assert main(["openpi", str(openpi_fixtures / "pi0_tiny" / "params_train_state_style"), str(out)]) == 0
    a = load_file(str(converted("pi0_tiny") / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_norm_stats_carried_over(openpi_fixtures, converted):
    import json

    src = openpi_fixtures / "pi0_tiny" / "assets" / "physical-intelligence" / "libero" / "norm_stats.json"
    assert json.loads((converted("pi0_tiny") / "norm_stats.json").read_text()) == json.loads(src.read_text())


def test_fixture_cameras_are_in_openpi_order(case):
    _, _, ref, obs = case
    assert list(obs.images) == list(IMAGE_KEYS)
