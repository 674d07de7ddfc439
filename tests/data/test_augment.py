"""openpi's training image augmentation: shapes, determinism, wrist cameras colour-only, identities, geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from pi0_lightning.data.augment import (
    AugmentConfig,
    augment_image,
    color_jitter,
    crop_resize_rotate,
    rotate_image,
)

OFF = {"crop_scale": 1.0, "rotate_degrees": 0.0, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0}


def textured(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    """A smooth gradient plus noise: every augmentation changes it."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], axis=-1)
    noise = np.random.default_rng(seed).integers(0, 40, (h, w, 3))
    return np.clip(base * 0.8 + noise, 0, 255).astype(np.uint8)


def diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())


@pytest.mark.parametrize("wrist", [False, True])
def test_shape_dtype_and_determinism(wrist: bool):
    img = textured()
    out = augment_image(img, np.random.default_rng(3), wrist)
    assert out.shape == img.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, augment_image(img, np.random.default_rng(3), wrist))
    assert not np.array_equal(out, augment_image(img, np.random.default_rng(4), wrist))
    assert not np.array_equal(out, img)


def test_draws_follow_the_documented_order():
    img = textured()
    rng, ref = np.random.default_rng(11), np.random.default_rng(11)
    out = augment_image(img, rng, wrist=False)
    top, left = int(ref.integers(0, 24 - 22 + 1)), int(ref.integers(0, 32 - 30 + 1))  # int(0.95 * side)
    angle = float(ref.uniform(-5, 5))
    factors = [float(ref.uniform(1 - m, 1 + m)) for m in (0.3, 0.4, 0.5)]
    expected = color_jitter(crop_resize_rotate(img, top, left, 22, 30, angle), *factors)
    np.testing.assert_array_equal(out, expected)
    assert rng.random() == ref.random()  # nothing else was drawn


def test_wrist_images_are_only_colour_jittered():
    img = textured()
    rng, ref = np.random.default_rng(5), np.random.default_rng(5)
    out = augment_image(img, rng, wrist=True)
    factors = [float(ref.uniform(1 - m, 1 + m)) for m in (0.3, 0.4, 0.5)]
    np.testing.assert_array_equal(out, color_jitter(img, *factors))
    # Without colour jitter a wrist image comes back untouched whatever the geometric magnitudes.
    geometry_only = AugmentConfig(crop_scale=0.5, rotate_degrees=30.0, brightness=0, contrast=0, saturation=0)
    np.testing.assert_array_equal(augment_image(img, np.random.default_rng(0), True, geometry_only), img)
    assert not np.array_equal(augment_image(img, np.random.default_rng(0), False, geometry_only), img)


@pytest.mark.parametrize("wrist", [False, True])
def test_zero_magnitudes_and_disabled_are_identities(wrist: bool):
    img = textured()
    for cfg in (AugmentConfig(**OFF), AugmentConfig(enabled=False)):
        out = augment_image(img, np.random.default_rng(1), wrist, cfg)
        np.testing.assert_array_equal(out, img)
        assert out is not img


def test_crop_zooms_without_black_borders():
    flat = np.full((20, 20, 3), 200, np.uint8)
    crop_only = AugmentConfig(**{**OFF, "crop_scale": 0.95})
    np.testing.assert_array_equal(augment_image(flat, np.random.default_rng(2), False, crop_only), flat)
    # A crop at a known offset is that box resized back (PIL's bilinear resize, up to rounding).
    img = textured()
    expected = np.asarray(Image.fromarray(img).resize((32, 24), Image.BILINEAR, box=(1, 2, 31, 24)))
    assert diff(crop_resize_rotate(img, 2, 1, 22, 30, 0.0), expected) <= 1


def test_rotation_moves_a_marker_counter_clockwise():
    img = np.zeros((33, 33, 3), np.uint8)
    img[15:18, 23:26] = 255  # 3x3 dot centred 8 px right of the image centre
    for degrees in (5.0, -5.0, 3.0):
        out = rotate_image(img, degrees)[..., 0].astype(np.float64)
        ys, xs = np.mgrid[0:33, 0:33] + 0.5
        cx, cy = (out * xs).sum() / out.sum(), (out * ys).sum() / out.sum()
        rad = math.radians(degrees)
        # Counter-clockwise on screen (y down): a point right of the centre moves up for positive angles.
        assert cx == pytest.approx(16.5 + 8 * math.cos(rad), abs=0.05)
        assert cy == pytest.approx(16.5 - 8 * math.sin(rad), abs=0.05)
    square = textured(16, 16)
    assert diff(rotate_image(square, 90), np.rot90(square)) <= 1
    assert diff(rotate_image(square, 180), square[::-1, ::-1]) <= 1
    corner = rotate_image(np.full((20, 20, 3), 255, np.uint8), 5.0)
    assert corner[0, 0].max() < 128 and corner[10, 10].min() == 255  # black fill outside the source


def test_colour_jitter_formulas():
    grey = np.full((4, 4, 3), 100, np.uint8)
    np.testing.assert_array_equal(color_jitter(grey, 1.2, 1.0, 1.0), np.full_like(grey, 120))
    np.testing.assert_array_equal(color_jitter(grey, 1.0, 1.4, 1.5), grey)  # flat and grey: no contrast or colour
    colour = np.zeros((2, 2, 3), np.uint8)
    colour[..., 0], colour[..., 1] = 200, 50
    desaturated = color_jitter(colour, 1.0, 1.0, 0.0)
    np.testing.assert_array_equal(desaturated, np.full_like(colour, 83))  # round((200 + 50 + 0) / 3)
    np.testing.assert_array_equal(color_jitter(colour, 2.0, 1.0, 1.0)[0, 0], [255, 100, 0])  # clipped once


def test_validation():
    with pytest.raises(ValueError, match="uint8"):
        augment_image(np.zeros((4, 4, 3), np.float32), np.random.default_rng(0), False)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        augment_image(np.zeros((4, 4), np.uint8), np.random.default_rng(0), False)
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentConfig(crop_scale=0.0)
    with pytest.raises(ValueError, match="brightness"):
        AugmentConfig(brightness=1.5)
