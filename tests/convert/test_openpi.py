"""openpi tree -> our state dict: detection, config inference from shapes, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from pi0_lightning.checkpoint import CheckpointError, build_model, check_state_dict
from pi0_lightning.convert.errors import ConversionError
from pi0_lightning.convert.openpi import detect_kind, infer_config, openpi_to_state_dict


@pytest.fixture(scope="module")
def params(openpi_fixtures):
    pytest.importorskip("tensorstore")
    from pi0_lightning.convert.orbax import read_openpi_params

    return {name: read_openpi_params(openpi_fixtures / name) for name in ("pi0_tiny", "pi05_tiny", "pi0_fast_tiny")}


def test_kind_detected_from_tree(params):
    assert [detect_kind(params[n]) for n in ("pi0_tiny", "pi05_tiny", "pi0_fast_tiny")] == ["pi0", "pi05", "pi0_fast"]


def test_config_from_shapes(params):
    cfg = infer_config(params["pi05_tiny"])
    assert cfg.pi05 and cfg.max_token_len == 200
    assert (cfg.vision.width, cfg.vision.depth, cfg.vision.mlp_dim, cfg.vision.num_heads) == (32, 2, 64, 2)
    assert (cfg.paligemma.width, cfg.paligemma.depth, cfg.paligemma.head_dim, cfg.paligemma.num_kv_heads) == (
        64,
        4,
        16,
        1,
    )
    assert cfg.vocab_size == 1024 and cfg.action_dim == 32
    assert infer_config(params["pi0_tiny"], action_horizon=10).action_horizon == 10


def test_every_leaf_is_mapped_to_the_right_shape(params):
    for name in ("pi0_tiny", "pi05_tiny"):
        cfg = infer_config(params[name])
        state = openpi_to_state_dict(params[name], cfg)
        expected = {k: v.shape for k, v in build_model(cfg).state_dict().items()}
        check_state_dict(expected, {k: v.shape for k, v in state.items()}, name)


def test_unknown_leaf_is_named(params):
    p = dict(params["pi0_tiny"])
    p["PaliGemma/llm/layers/attn/q_einsum/lora_a"] = np.zeros((4, 8, 64, 2), np.float32)
    with pytest.raises(ConversionError, match="lora_a"):
        openpi_to_state_dict(p, infer_config(p))


def test_missing_leaf_is_named(params):
    p = dict(params["pi0_tiny"])
    del p["action_out_proj/bias"]
    with pytest.raises(ConversionError, match="action_out_proj/bias"):
        openpi_to_state_dict(p, infer_config(p))


def test_shape_mismatch_is_reported_with_both_shapes(params):
    cfg = infer_config(params["pi0_tiny"])
    expected = {k: v.shape for k, v in build_model(cfg).state_dict().items()}
    got = dict(expected)
    got["action_out_proj.weight"] = (3, 3)
    with pytest.raises(CheckpointError, match=r"action_out_proj.weight \(3, 3\) != \(32, 64\)"):
        check_state_dict(expected, got, "x")
