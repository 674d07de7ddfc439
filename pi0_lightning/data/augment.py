"""openpi's training-time image augmentation, on uint8 HWC numpy images with a ``numpy.random.Generator``.

openpi augments inside ``preprocess_observation(train=True)``, after resizing to the model's 224x224, on images in
[0, 1]. Its JAX path (``src/openpi/models/model.py``, augmax) and PyTorch path
(``src/openpi/models_pytorch/preprocessing_pytorch.py``) agree on the geometry and differ on colour:

* Cameras whose key does not contain "wrist": a random crop of ``int(0.95 * H) x int(0.95 * W)`` at a uniform
  integer offset, bilinearly resized back to H x W, then a rotation by an angle uniform in [-5, 5] degrees about the
  centre, bilinear, the area outside the source filled with black. (augmax composes crop, resize and rotation into
  one resampling; the PyTorch path resamples twice and skips angles below 0.1 degrees.)
* Every camera, PyTorch path, in this fixed order on float images, clipped to [0, 1] once at the end: brightness
  ``x * b``, b ~ U[0.7, 1.3]; contrast ``(x - m) * c + m``, m the mean over all pixels and channels,
  c ~ U[0.6, 1.4]; saturation ``g + (x - g) * s``, g the per-pixel mean of the three channels, s ~ U[0.5, 1.5].
* Every camera, JAX path: ``augmax.ColorJitter(brightness=0.3, contrast=0.4, saturation=0.5)`` with augmax's
  defaults ``hue=0.1`` and ``p=0.5``. In HSV, in the fixed order brightness, contrast, hue, with offsets
  uniform in [-x, x] (GIMP-style brightness and an invertible piecewise-linear contrast on V, a hue shift of up to a
  tenth of a turn), applied to half the images. Its saturation step discards its result (augmax 0.3.4 - 0.4.1), so
  saturation is never changed.

This module follows the PyTorch path's colour jitter: factors uniform in [1 - x, 1 + x], fixed order brightness,
contrast, saturation, no random order (torchvision's ``ColorJitter`` permutes; neither openpi path does). One
deliberate difference: openpi's PyTorch path draws one set of parameters per batch; here every call (one image)
draws its own, as augmax does. Crop, resize and rotation are one PIL bilinear affine resampling, as in augmax.

The draws per call, in order: for a non-wrist image crop top, crop left, angle; then brightness, contrast and
saturation factors. They are drawn whatever the magnitudes, so a magnitude of 0 only makes its draw a no-op, and a
given generator state always yields the same image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass
class AugmentConfig:
    """openpi's augmentation magnitudes; set any to 0 (``crop_scale`` to 1) to switch that part off."""

    enabled: bool = True
    """False: images pass through unchanged."""
    crop_scale: float = 0.95
    """Side of the random crop as a fraction of each image side (non-wrist cameras), in (0, 1]."""
    rotate_degrees: float = 5.0
    """Rotation angle bound: uniform in [-rotate_degrees, rotate_degrees], counter-clockwise positive (non-wrist)."""
    brightness: float = 0.3
    """Brightness factor uniform in [1 - brightness, 1 + brightness] (all cameras)."""
    contrast: float = 0.4
    """Contrast factor uniform in [1 - contrast, 1 + contrast], about the image mean (all cameras)."""
    saturation: float = 0.5
    """Saturation factor uniform in [1 - saturation, 1 + saturation], about the per-pixel channel mean."""

    def __post_init__(self) -> None:
        if not 0.0 < self.crop_scale <= 1.0:
            raise ValueError(f"crop_scale must be in (0, 1], got {self.crop_scale}")
        if self.rotate_degrees < 0:
            raise ValueError(f"rotate_degrees must be >= 0, got {self.rotate_degrees}")
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")


def _check_image(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {img.dtype} {img.shape}")
    return img


def _affine(img: np.ndarray, box: tuple[float, float, float, float], degrees: float) -> np.ndarray:
    """Resample ``img`` so that ``box`` (left, top, width, height, in pixel-edge coordinates) fills the output,
    rotated ``degrees`` counter-clockwise about the output centre; one bilinear pass, black outside the source."""
    h, w = img.shape[:2]
    left, top, bw, bh = box
    sx, sy = bw / w, bh / h
    cx, cy = w / 2.0, h / 2.0
    rad = math.radians(degrees)
    cos, sin = math.cos(rad), math.sin(rad)
    # Output point (u, v) -> unrotated point about the centre (image y points down, so counter-clockwise on screen
    # is the inverse of the usual matrix) -> scaled into the crop box of the input.
    coeffs = (
        sx * cos,
        -sx * sin,
        sx * (cx - cos * cx + sin * cy) + left,
        sy * sin,
        sy * cos,
        sy * (cy - sin * cx - cos * cy) + top,
    )
    out = Image.fromarray(img).transform((w, h), Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=(0, 0, 0))
    return np.asarray(out)


def rotate_image(img: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate an (H, W, 3) uint8 image by ``degrees`` counter-clockwise about its centre, same size, black fill."""
    img = _check_image(img)
    if degrees == 0:
        return img.copy()
    h, w = img.shape[:2]
    return _affine(img, (0.0, 0.0, float(w), float(h)), degrees)


def crop_resize_rotate(img: np.ndarray, top: int, left: int, height: int, width: int, degrees: float) -> np.ndarray:
    """Crop ``img[top:top + height, left:left + width]``, resize it back to the image size, rotate by ``degrees``
    counter-clockwise: one bilinear resampling. The identity (full crop, no rotation) returns an exact copy."""
    img = _check_image(img)
    h, w = img.shape[:2]
    if (top, left, height, width) == (0, 0, h, w) and degrees == 0:
        return img.copy()
    return _affine(img, (float(left), float(top), float(width), float(height)), degrees)


def color_jitter(img: np.ndarray, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """openpi's PyTorch colour jitter with the given factors (1 = unchanged), in float32, clipped and rounded to
    uint8 once at the end. All three factors 1 return an exact copy."""
    img = _check_image(img)
    if brightness == 1.0 and contrast == 1.0 and saturation == 1.0:
        return img.copy()
    x = img.astype(np.float32) * np.float32(1.0 / 255.0)
    x *= np.float32(brightness)
    mean = x.mean(dtype=np.float32)
    x = (x - mean) * np.float32(contrast) + mean
    gray = x.mean(axis=-1, keepdims=True, dtype=np.float32)
    x = gray + (x - gray) * np.float32(saturation)
    return np.rint(np.clip(x, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)


def augment_image(
    img: np.ndarray, rng: np.random.Generator, wrist: bool, config: AugmentConfig | None = None
) -> np.ndarray:
    """One training augmentation of an (H, W, 3) uint8 image: crop + resize + rotate unless ``wrist``, then colour
    jitter; a new uint8 array of the same shape. Deterministic for a given ``rng`` state."""
    cfg = config if config is not None else AugmentConfig()
    img = _check_image(img)
    if not cfg.enabled:
        return img.copy()
    out = img
    if not wrist:
        h, w = img.shape[:2]
        # int() truncation as openpi's int(width * 0.95); at least one pixel.
        ch, cw = max(1, int(h * cfg.crop_scale)), max(1, int(w * cfg.crop_scale))
        top = int(rng.integers(0, h - ch + 1))
        left = int(rng.integers(0, w - cw + 1))
        angle = float(rng.uniform(-cfg.rotate_degrees, cfg.rotate_degrees))
        out = crop_resize_rotate(out, top, left, ch, cw, angle)
    factors = [float(rng.uniform(1.0 - m, 1.0 + m)) for m in (cfg.brightness, cfg.contrast, cfg.saturation)]
    return color_jitter(out, *factors)
