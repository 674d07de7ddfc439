"""LIBERO transforms against numbers worked out by hand (see the comments next to each expected value)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pi0_lightning.model.config import IMAGE_KEYS
from pi0_lightning.policy.transforms import (
    LiberoTransforms,
    Normalizer,
    NormStats,
    image_to_model,
    libero_state,
    prepare_camera_images,
    quat2axisangle,
    resize_with_pad,
    rotate_180,
)

S45 = math.sqrt(0.5)  # sin(45 deg) == cos(45 deg)


def _stats_dict(dim: int = 8, act_dim: int = 7) -> dict:
    return {
        "norm_stats": {
            "state": {
                "mean": [0.0] * dim,
                "std": [1.0] * dim,
                "q01": [-1.0] * dim,
                "q99": [1.0] * dim,
            },
            "actions": {
                "mean": [0.0] * act_dim,
                "std": [1.0] * act_dim,
                "q01": [-1.0] * act_dim,
                "q99": [1.0] * act_dim,
            },
        }
    }


# ---------------------------------------------------------------------------------------------------------------
# quat2axisangle / state
# ---------------------------------------------------------------------------------------------------------------


def test_quat2axisangle_90deg_about_z():
    # w = cos45, den = sqrt(1 - 1/2) = sin45, acos(w) = pi/4: z = sin45 * 2 * pi/4 / sin45 = pi/2.
    np.testing.assert_allclose(quat2axisangle([0.0, 0.0, S45, S45]), [0.0, 0.0, math.pi / 2], atol=1e-12)


def test_quat2axisangle_180deg_about_x():
    # w = 0: den = 1, acos(0) = pi/2, so x = 1 * 2 * pi/2 = pi.
    np.testing.assert_allclose(quat2axisangle([1.0, 0.0, 0.0, 0.0]), [math.pi, 0.0, 0.0], atol=1e-12)


def test_quat2axisangle_identity_and_clipping():
    np.testing.assert_array_equal(quat2axisangle([0.0, 0.0, 0.0, 1.0]), np.zeros(3))
    # w > 1 is clipped to 1 -> den == 0 -> zeros; the caller's array is left alone.
    q = np.array([0.0, 0.0, 0.0, 1.0000001])
    np.testing.assert_array_equal(quat2axisangle(q), np.zeros(3))
    assert q[3] == 1.0000001
    # w = -1 (a full turn, same rotation) -> den == 0 -> zeros as well.
    np.testing.assert_array_equal(quat2axisangle([0.0, 0.0, 0.0, -1.0]), np.zeros(3))


def test_libero_state_layout():
    s = libero_state([0.1, 0.2, 0.3], [0.0, 0.0, S45, S45], [0.04, -0.04])
    assert s.shape == (8,) and s.dtype == np.float32
    np.testing.assert_allclose(s, [0.1, 0.2, 0.3, 0.0, 0.0, math.pi / 2, 0.04, -0.04], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------------------------


def _two_dim_normalizer(mode: str) -> Normalizer:
    stats = NormStats(mean=[1.0, -2.0], std=[2.0, 0.5], q01=[-2.0, 0.0], q99=[2.0, 10.0])
    return Normalizer(state=stats, actions=stats, mode=mode)


def test_zscore_by_hand():
    n = _two_dim_normalizer("zscore")
    # (3 - 1) / (2 + 1e-6) = 2 / 2.000001 = 0.99999950000025 ; (-1 + 2) / (0.5 + 1e-6) = 1 / 0.500001 = 1.999996000008
    out = n.normalize_state([3.0, -1.0])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.99999950000025, 1.999996000008], rtol=1e-7)
    # inverse: 0.5 * 2.000001 + 1 = 2.0000005 ; 4 * 0.500001 - 2 = 0.000004
    np.testing.assert_allclose(n.unnormalize_actions([0.5, 4.0]), [2.0000005, 0.000004], rtol=1e-6, atol=1e-9)


def test_quantile_by_hand():
    n = _two_dim_normalizer("quantile")
    # q01 -> exactly -1.
    np.testing.assert_array_equal(n.normalize_state([-2.0, 0.0]), [-1.0, -1.0])
    # q99 -> 4 / 4.000001 * 2 - 1 = 1 - 5e-7 ; 10 / 10.000001 * 2 - 1 = 1 - 2e-7.
    np.testing.assert_allclose(n.normalize_state([2.0, 10.0]), [1 - 5e-7, 1 - 2e-7], atol=1e-7)
    # midpoint -> 2 / 4.000001 * 2 - 1 = -2.5e-7 ; 5 / 10.000001 * 2 - 1 = -1e-7 (i.e. ~0).
    np.testing.assert_allclose(n.normalize_state([0.0, 5.0]), [0.0, 0.0], atol=1e-6)
    # inverse of 0: (0 + 1) / 2 * 4.000001 - 2 = 0.0000005 ; 1/2 * 10.000001 + 0 = 5.0000005.
    np.testing.assert_allclose(n.unnormalize_actions([0.0, 0.0]), [5e-7, 5.0000005], atol=1e-6)


@pytest.mark.parametrize("mode", ["zscore", "quantile"])
def test_unnormalize_inverts_normalize(mode):
    n = _two_dim_normalizer(mode)
    x = np.array([[3.0, -1.0], [-0.25, 7.5], [1.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(n.unnormalize_actions(n.normalize_actions(x)), x, atol=2e-6)


def test_32_dim_stats_are_sliced_and_padded():
    d = _stats_dict(32, 32)
    d["norm_stats"]["state"]["mean"] = list(range(32))
    d["norm_stats"]["actions"]["mean"] = list(range(32))
    n = Normalizer.from_json(d, "zscore")
    # zeros(8): (0 - i) / (1 + 1e-6) for i < 8.
    out = n.normalize_state(np.zeros(8))
    assert out.shape == (8,)
    np.testing.assert_allclose(out, -np.arange(8) / 1.000001, rtol=1e-6)
    assert n.normalize_actions(np.zeros((2, 7))).shape == (2, 7)
    with pytest.raises(ValueError, match="9 dims"):
        Normalizer.from_json(_stats_dict(8, 7), "zscore").normalize_state(np.zeros(9))


def test_unnormalize_wider_than_stats():
    # 2-dim stats, 4-dim data: z-score pads mean 0 / std 1 -> x * 1.000001; quantile passes columns through.
    x = np.array([0.0, 0.0, 3.0, -1.0])
    z = _two_dim_normalizer("zscore").unnormalize_actions(x)
    np.testing.assert_allclose(z, [1.0, -2.0, 3.000003, -1.000001], rtol=1e-6)
    q = _two_dim_normalizer("quantile").unnormalize_actions(x)
    np.testing.assert_allclose(q, [5e-7, 5.0000005, 3.0, -1.0], atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Loading and error messages
# ---------------------------------------------------------------------------------------------------------------


def test_from_json_file_dir_nested_and_dict(tmp_path):
    d = _stats_dict()
    f = tmp_path / "norm_stats.json"
    f.write_text(json.dumps(d))
    for src in (f, str(f), tmp_path, d, d["norm_stats"]):
        n = Normalizer.from_json(src, "quantile")
        assert n.state.dim == 8 and n.actions.dim == 7 and n.mode == "quantile"
        assert n.state.mean.dtype == np.float32
    # openpi checkpoint layout: <ckpt>/assets/<asset_id>/norm_stats.json
    nested = tmp_path / "ckpt" / "assets" / "physical-intelligence" / "libero"
    nested.mkdir(parents=True)
    (nested / "norm_stats.json").write_text(json.dumps(d))
    assert Normalizer.from_json(tmp_path / "ckpt").state.dim == 8


def test_missing_file_errors(tmp_path):
    missing = tmp_path / "nope" / "norm_stats.json"
    with pytest.raises(FileNotFoundError, match="nope"):
        Normalizer.from_json(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        Normalizer.from_json(tmp_path / "empty")


def test_missing_key_errors(tmp_path):
    d = _stats_dict()
    del d["norm_stats"]["actions"]
    f = tmp_path / "norm_stats.json"
    f.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"norm_stats\.actions") as e:
        Normalizer.from_json(f)
    assert str(f) in str(e.value)

    d = _stats_dict()
    del d["norm_stats"]["state"]["std"]
    with pytest.raises(ValueError, match=r"norm_stats\.state.*'std'"):
        Normalizer.from_json(d)

    with pytest.raises(ValueError, match="'norm_stats'"):
        Normalizer.from_json({"something": {}})

    d = _stats_dict()
    del d["norm_stats"]["actions"]["q99"]
    Normalizer.from_json(d, "zscore")  # z-score does not need quantiles
    with pytest.raises(ValueError, match="'actions'.'q99'"):
        Normalizer.from_json(d, "quantile")

    with pytest.raises(ValueError, match="mode"):
        Normalizer.from_json(_stats_dict(), "minmax")


# ---------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------


def test_rotate_180_small():
    img = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint8)
    np.testing.assert_array_equal(rotate_180(img), [[6, 5, 4], [3, 2, 1]])
    rgb = np.stack([img, img + 10, img + 20], axis=-1)
    out = rotate_180(rgb)
    assert out.shape == (2, 3, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out[0, 0], [6, 16, 26])
    np.testing.assert_array_equal(out[1, 2], [1, 11, 21])


def test_resize_with_pad_wide_image_has_centred_black_bars():
    # 100 x 200 (H x W): ratio = 200/224, new size 112 x 224, top bar int((224 - 112) / 2) = 56 rows.
    img = np.full((100, 200, 3), 200, dtype=np.uint8)
    out = resize_with_pad(img, 224, 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert (out[:56] == 0).all() and (out[168:] == 0).all()
    assert (out[56:168] == 200).all()


def test_resize_with_pad_odd_padding_and_tall_image():
    # 81 x 160: new height int(81 * 224 / 160) = int(113.4) = 113, bars int(111 / 2) = 55 above, 56 below.
    out = resize_with_pad(np.full((81, 160, 3), 7, dtype=np.uint8), 224, 224)
    assert (out[:55] == 0).all() and (out[55:168] == 7).all() and (out[168:] == 0).all()
    # Tall 200 x 100: bars are columns this time.
    out = resize_with_pad(np.full((200, 100, 3), 9, dtype=np.uint8), 224, 224)
    assert (out[:, :56] == 0).all() and (out[:, 56:168] == 9).all() and (out[:, 168:] == 0).all()


def test_resize_with_pad_square_is_plain_bilinear_resize():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(img).resize((224, 224), resample=Image.BILINEAR))
    np.testing.assert_array_equal(resize_with_pad(img, 224, 224), expected)
    # batched input, and the target size is returned unchanged
    batch = np.stack([img, img[::-1]])
    assert resize_with_pad(batch, 224, 224).shape == (2, 224, 224, 3)
    np.testing.assert_array_equal(resize_with_pad(batch, 224, 224)[0], expected)
    assert resize_with_pad(expected, 224, 224) is expected


def test_image_to_model_range_and_layout():
    img = np.zeros((2, 3, 3), dtype=np.uint8)
    img[0, 0] = [0, 255, 51]
    out = image_to_model(img)
    assert out.shape == (3, 2, 3) and out.dtype == np.float32
    # 0 -> -1, 255 -> 1, 51 -> 51 / 255 * 2 - 1 = 0.2 * 2 - 1 = -0.6
    np.testing.assert_allclose(out[:, 0, 0], [-1.0, 1.0, -0.6], atol=1e-6)
    assert out[0, 1, 2] == -1.0


# ---------------------------------------------------------------------------------------------------------------
# LiberoTransforms
# ---------------------------------------------------------------------------------------------------------------


def _delta_transforms(delta: bool = True) -> LiberoTransforms:
    d = _stats_dict()
    d["norm_stats"]["actions"]["mean"] = [0.1, 0.2, 0.3, 0.0, 0.0, 0.0, 0.0]
    d["norm_stats"]["actions"]["std"] = [2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0]
    return LiberoTransforms(Normalizer.from_json(d, "zscore"), delta_actions=delta)


RAW_STATE = np.array([[1.0, 2.0, 3.0, 0.5, -0.5, 0.25, 0.04, -0.04]])


def _model_actions() -> np.ndarray:
    m = np.full((1, 2, 32), 9.0)  # columns 7.. must be dropped
    m[0, 0, :7] = [0.5, -0.5, 0.0, 1.0, -1.0, 2.0, 1.0]
    m[0, 1, :7] = [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    return m


def test_outputs_delta_actions_by_hand():
    out = _delta_transforms().outputs(_model_actions(), RAW_STATE)
    assert out.shape == (1, 2, 7) and out.dtype == np.float32
    # unnormalise: x * (std + 1e-6) + mean; then + state[:6] on dims 0-5 (the same state on both rows).
    # row 0: 0.5*2.000001+0.1+1 = 2.1000005 ; -0.5*2.000001+0.2+2 = 1.1999995 ; 0.3+3 = 3.3 ;
    #        1.000001+0.5 = 1.500001 ; -1.000001-0.5 = -1.500001 ; 2.000002+0.25 = 2.250002 ; gripper 1.000001
    # row 1: 0.1+1 = 1.1 ; 0.2+2 = 2.2 ; 2.000001+0.3+3 = 5.300001 ; 0.5 ; -0.5 ; 0.25 ; gripper -1.000001
    expected = [
        [2.1000005, 1.1999995, 3.3, 1.500001, -1.500001, 2.250002, 1.000001],
        [1.1, 2.2, 5.300001, 0.5, -0.5, 0.25, -1.000001],
    ]
    np.testing.assert_allclose(out[0], expected, rtol=0, atol=1e-6)


def test_outputs_absolute_actions_and_torch_input():
    out = _delta_transforms(delta=False).outputs(torch.from_numpy(_model_actions()).float(), RAW_STATE)
    expected_row1 = [0.1, 0.2, 2.300001, 0.0, 0.0, 0.0, -1.000001]
    np.testing.assert_allclose(out[0, 1], expected_row1, rtol=0, atol=1e-6)


@pytest.mark.parametrize("delta", [True, False])
def test_actions_to_model_round_trips(delta):
    t = _delta_transforms(delta)
    m = _model_actions()
    back = t.actions_to_model(t.outputs(m, RAW_STATE), RAW_STATE)
    assert back.shape == (1, 2, 32) and back.dtype == np.float32
    np.testing.assert_allclose(back[..., :7], m[..., :7], atol=2e-6)
    np.testing.assert_array_equal(back[..., 7:], 0.0)
    env = np.array([[[0.3, -0.2, 1.0, 0.1, 0.0, -0.1, -1.0], [0.0, 0.5, 0.5, 0.2, 0.2, 0.2, 1.0]]])
    np.testing.assert_allclose(t.outputs(t.actions_to_model(env, RAW_STATE), RAW_STATE), env, atol=2e-6)


def test_actions_to_model_by_hand():
    # env row [1.1, 2.2, 5.3, 0.5, -0.5, 0.25, -1]: minus state -> [0.1, 0.2, 2.3, 0, 0, 0, -1];
    # normalise -> [0, 0, 2 / 2.000001, 0, 0, 0, -1 / 1.000001]
    env = np.array([[[1.1, 2.2, 5.3, 0.5, -0.5, 0.25, -1.0]]])
    out = _delta_transforms().actions_to_model(env, RAW_STATE)
    np.testing.assert_allclose(out[0, 0, :7], [0, 0, 0.9999995, 0, 0, 0, -0.999999], atol=1e-6)


def test_camera_images_rotate_then_resize():
    t = _delta_transforms()
    agent = np.zeros((256, 256, 3), dtype=np.uint8)
    agent[:128] = 255  # white top half -> after the 180-degree turn the bottom half is white
    wrist = np.full((256, 256, 3), 30, dtype=np.uint8)
    a, w = t.camera_images(agent, wrist)
    assert a.shape == w.shape == (224, 224, 3) and a.dtype == w.dtype == np.uint8
    assert (a[:100] == 0).all() and (a[124:] == 255).all()
    assert (w == 30).all()


@pytest.mark.parametrize("size", [224, 112])
def test_env_prepared_images_are_used_as_they_are(size):
    """The env's preparation (`prepare_camera_images`) of a raw render equals the policy's own, and the policy keeps
    prepared images as they are (no second rotation) after checking their size."""
    rng = np.random.default_rng(size)
    agent, wrist = (rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(2))
    t = LiberoTransforms(_delta_transforms().normalizer, image_size=size)
    from_raw = t.camera_images(agent, wrist)
    env_side = prepare_camera_images(agent, wrist, size)
    from_prepared = t.camera_images(*env_side, prepared=True)
    for a, b, c in zip(from_raw, env_side, from_prepared, strict=True):
        assert a.shape == (size, size, 3) and a.dtype == np.uint8
        assert np.array_equal(a, b) and np.array_equal(a, c)
    np.testing.assert_array_equal(env_side[0], resize_with_pad(agent[::-1, ::-1], size, size))
    other = 112 if size == 224 else 224
    with pytest.raises(ValueError, match=rf"prepared agentview images of shape \({other}, {other}, 3\).*{size}x{size}"):
        t.camera_images(*prepare_camera_images(agent, wrist, other), prepared=True)
    with pytest.raises(ValueError, match="wrist.*float32"):
        t.camera_images(env_side[0], env_side[1].astype(np.float32), prepared=True)


def test_env_modules_import_the_image_functions_without_torch():
    """Env workers prepare images with this module's functions; torch (~400 MB per worker) stays out of them."""
    import subprocess
    import sys

    code = "import sys, pi0_lightning.envs.libero; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_inputs_shapes_dtypes_and_masks():
    t = _delta_transforms()
    agent = np.full((224, 224, 3), 255, dtype=np.uint8)
    wrist = np.zeros((224, 224, 3), dtype=np.uint8)
    odd = resize_with_pad(np.full((100, 200, 3), 255, dtype=np.uint8), 224, 224)  # as camera_images pads it
    states = np.array([[0.5] * 8, [-1.0] * 8])
    out = t.inputs([(agent, wrist), (odd, wrist)], states)
    assert set(out["images"]) == set(out["image_masks"]) == set(IMAGE_KEYS)
    for key in IMAGE_KEYS:
        assert out["images"][key].shape == (2, 3, 224, 224) and out["images"][key].dtype == torch.float32
        assert out["image_masks"][key].shape == (2,) and out["image_masks"][key].dtype == torch.bool
    assert (out["images"]["base_0_rgb"][0] == 1.0).all()
    assert (out["images"]["left_wrist_0_rgb"] == -1.0).all()
    assert (out["images"]["right_wrist_0_rgb"] == -1.0).all()
    assert (out["images"]["base_0_rgb"][1, :, :56] == -1.0).all()  # black bar from the padding
    assert (out["images"]["base_0_rgb"][1, :, 56:168] == 1.0).all()
    assert out["image_masks"]["base_0_rgb"].tolist() == [True, True]
    assert out["image_masks"]["left_wrist_0_rgb"].tolist() == [True, True]
    assert out["image_masks"]["right_wrist_0_rgb"].tolist() == [False, False]
    # state stats: mean 0, std 1 -> x / 1.000001, then zero-padded to 32.
    state = out["state"]
    assert state.shape == (2, 32) and state.dtype == torch.float32
    torch.testing.assert_close(state[:, :8], torch.tensor(states / 1.000001, dtype=torch.float32))
    assert (state[:, 8:] == 0).all()

    fast = LiberoTransforms(t.normalizer, mask_right_wrist=False).inputs([(agent, wrist)], states[:1])
    assert fast["image_masks"]["right_wrist_0_rgb"].tolist() == [True]


def test_inputs_rejects_mismatched_batch_and_unsized_images():
    t = _delta_transforms()
    img = np.zeros((224, 224, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="2 states"):
        t.inputs([(img, img)], np.zeros((2, 8)))
    with pytest.raises(ValueError, match=r"224x224.*camera_images"):
        t.inputs([(np.zeros((256, 256, 3), np.uint8), img)], np.zeros((1, 8)))
