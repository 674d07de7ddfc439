"""LIBERO observation / action transforms, in the order openpi applies them to its LIBERO checkpoints.

Pure numpy + PIL; torch appears only at the boundary (:meth:`LiberoTransforms.inputs` returns tensors and
:meth:`LiberoTransforms.outputs` accepts them) and is imported there, so that env workers can import the image
functions without torch. Nothing here imports the model or the simulator.

openpi's order of operations for one LIBERO step (file names only; all from the openpi repository):

Client side (``examples/libero/main.py``, ``openpi_client/image_tools.py``):

1. Both camera images (``agentview_image`` and ``robot0_eye_in_hand_image``, uint8 HWC, rendered at 256x256)
   are rotated by 180 degrees, ``img[::-1, ::-1]``, "to match train preprocessing".
2. ``resize_with_pad(img, 224, 224)``: a PIL resize (bilinear by default) that keeps the aspect ratio,
   ``ratio = max(w / W, h / H)``, new size ``int(w / ratio), int(h / ratio)``, pasted at offset
   ``int((W - new_w) / 2), int((H - new_h) / 2)`` on a black canvas. An image that already has the target size is
   returned unchanged. For the square 256x256 LIBERO renders this is a plain PIL bilinear resize to 224x224.
3. State (8 dims) = ``concat(robot0_eef_pos (3), quat2axisangle(robot0_eef_quat) (3), robot0_gripper_qpos (2))``,
   the quaternion in robosuite's xyzw order; ``quat2axisangle`` is robosuite's (``utils/transform_utils.py``).

Server side, inputs (``src/openpi/policies/libero_policy.py`` ``LiberoInputs``, ``src/openpi/transforms.py``,
``src/openpi/training/config.py`` ``LeRobotLiberoDataConfig``):

4. Images ``base_0_rgb`` = agentview, ``left_wrist_0_rgb`` = wrist, ``right_wrist_0_rgb`` = ``zeros_like`` (black).
   Image masks: True, True, and for the right wrist False for PI0 / PI0.5, True for PI0-FAST.
5. ``Normalize`` (``transforms.py``, stats from ``shared/normalize.py``'s ``norm_stats.json``): z-score for PI0,
   ``(x - mean) / (std + 1e-6)``; quantile for PI0.5 and PI0-FAST, ``(x - q01) / (q99 - q01 + 1e-6) * 2 - 1``.
   The stats are sliced to the data's last dimension (older stats files are 32 wide).
6. ``PadStatesAndActions``: zero-pad state (and training actions) to the model action dim, 32.
7. ``ResizeImages(224, 224)`` (a no-op here: the client already sent 224x224), then the model converts uint8 to
   float, ``x / 255 * 2 - 1``, HWC -> CHW (``src/openpi/models/model.py``).

Server side, outputs (``src/openpi/policies/policy.py``; output transforms run in reverse order of the inputs):

8. ``Unnormalize`` of the model's (H, 32) actions with the action stats: z-score ``x * (std + 1e-6) + mean`` with
   the stats padded by mean 0 / std 1; quantile ``(x + 1) / 2 * (q99 - q01 + 1e-6) + q01`` on the stats' width,
   columns past it passed through unchanged.
9. ``AbsoluteActions(make_bool_mask(6, -1))`` when the config sets ``extra_delta_transform`` (``pi0_libero`` and
   ``pi0_fast_libero``; not ``pi05_libero``): the chunk-start state's first 6 dims are added to every row of the
   chunk, the gripper (dim 6) stays absolute. openpi adds ``Unnormalize(Normalize(state))``, which is the raw state
   up to float rounding; we add the raw state.
10. ``LiberoOutputs``: keep the first 7 dims.

Steps 1-2 can run where the pixels are: :func:`prepare_camera_images` is the one implementation, used by the policy
(:meth:`LiberoTransforms.camera_images`) and by the LIBERO env when ``LiberoEnvConfig.image_size`` is set. Such an
env marks its observations with ``PREPARED_IMAGES_KEY`` (``"images_prepared": True``), and the policy then only checks
that their size is the model's: the model inputs are bit-identical either way.

:meth:`LiberoTransforms.actions_to_model` inverts 8-10 (subtract state, normalise, zero-pad) so that actions the
policy executed can be mapped back into model space.

Deliberate details:

* Normalisation runs in float64 and returns float32 (openpi computes in whatever numpy promotes to, usually
  float64 because the stats come from JSON; the difference is float32 rounding).
* ``quat2axisangle`` does not modify its argument (robosuite's clips ``quat[3]`` in place).
* Normalising data wider than its stats raises a ``ValueError`` (openpi would fail with a broadcasting error).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

NORM_STATS_FILENAME = "norm_stats.json"
_EPS = 1e-6

# openpi's LIBERO delta mask: make_bool_mask(6, -1) -> the 6 eef pose dims are deltas, the gripper is absolute.
_DELTA_DIMS = 6


# ----------------------------------------------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------------------------------------------


def _as_f32(value: Any, name: str) -> np.ndarray | None:
    if value is None:
        return None
    arr = np.asarray(value, dtype=np.float32)
    if arr.ndim != 1:
        raise ValueError(f"norm stat {name!r} must be a 1-D list, got shape {arr.shape}")
    return arr


@dataclass
class NormStats:
    """One key's statistics from openpi's ``norm_stats.json``. ``q01`` / ``q99`` are needed for quantile mode."""

    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray | None = None
    q99: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.mean = _as_f32(self.mean, "mean")
        self.std = _as_f32(self.std, "std")
        self.q01 = _as_f32(self.q01, "q01")
        self.q99 = _as_f32(self.q99, "q99")
        widths = {k: v.shape[0] for k, v in vars(self).items() if v is not None}
        if len(set(widths.values())) > 1:
            raise ValueError(f"norm stats have different widths: {widths}")

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "norm stats") -> NormStats:
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: expected a mapping with 'mean' and 'std', got {type(d).__name__}")
        for key in ("mean", "std"):
            if key not in d:
                raise ValueError(f"{where}: missing key {key!r} (has {sorted(d)})")
        return cls(mean=d["mean"], std=d["std"], q01=d.get("q01"), q99=d.get("q99"))


def _find_norm_stats_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        direct = path / NORM_STATS_FILENAME
        if direct.is_file():
            return direct
        # openpi checkpoints keep it at assets/<asset_id>/norm_stats.json (e.g. assets/physical-intelligence/libero).
        found = sorted(path.rglob(NORM_STATS_FILENAME))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            listed = ", ".join(str(p) for p in found)
            raise ValueError(f"{path}: several {NORM_STATS_FILENAME} files below it, pass one of: {listed}")
        raise FileNotFoundError(f"no {NORM_STATS_FILENAME} in directory {path} (nor below it)")
    raise FileNotFoundError(f"norm stats file not found: {path}")


def _pad_stat(stat: np.ndarray, dim: int, value: float) -> np.ndarray:
    if stat.shape[0] >= dim:
        return stat[:dim]
    return np.concatenate([stat, np.full(dim - stat.shape[0], value, dtype=stat.dtype)])


@dataclass
class Normalizer:
    """openpi's ``Normalize`` / ``Unnormalize`` for the ``state`` and ``actions`` keys."""

    state: NormStats
    actions: NormStats
    mode: Literal["zscore", "quantile"] = "zscore"

    def __post_init__(self) -> None:
        if self.mode not in ("zscore", "quantile"):
            raise ValueError(f"mode must be 'zscore' or 'quantile', got {self.mode!r}")
        if self.mode == "quantile":
            for name, stats in (("state", self.state), ("actions", self.actions)):
                for q in ("q01", "q99"):
                    if getattr(stats, q) is None:
                        raise ValueError(f"quantile normalisation needs {name!r}.{q!r}, which the norm stats lack")

    @classmethod
    def from_json(
        cls, path_or_dict: str | Path | Mapping[str, Any], mode: Literal["zscore", "quantile"] = "zscore"
    ) -> Normalizer:
        """Load from a ``norm_stats.json`` path, a directory holding one, or the already parsed dict.

        The dict may be the file's content (``{"norm_stats": {"state": ..., "actions": ...}}``) or its inner part.
        """
        if isinstance(path_or_dict, Mapping):
            data: Any = path_or_dict
            where = "norm stats dict"
        else:
            file = _find_norm_stats_file(Path(path_or_dict))
            where = str(file)
            try:
                data = json.loads(file.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from e
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if "norm_stats" in data:
            data = data["norm_stats"]
        elif "state" not in data and "actions" not in data:
            raise ValueError(f"{where}: missing key 'norm_stats' (has {sorted(data)})")
        for key in ("state", "actions"):
            if key not in data:
                raise ValueError(f"{where}: missing key 'norm_stats.{key}' (has {sorted(data)})")
        return cls(
            state=NormStats.from_dict(data["state"], where=f"{where}: norm_stats.state"),
            actions=NormStats.from_dict(data["actions"], where=f"{where}: norm_stats.actions"),
            mode=mode,
        )

    # -- forward ------------------------------------------------------------------------------------------------

    def _normalize(self, x: Any, stats: NormStats, name: str) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        d = x.shape[-1]
        if d > stats.dim:
            raise ValueError(f"{name} has {d} dims but its norm stats only {stats.dim}")
        if self.mode == "zscore":
            mean, std = stats.mean[:d].astype(np.float64), stats.std[:d].astype(np.float64)
            out = (x - mean) / (std + _EPS)
        else:
            q01, q99 = stats.q01[:d].astype(np.float64), stats.q99[:d].astype(np.float64)
            out = (x - q01) / (q99 - q01 + _EPS) * 2.0 - 1.0
        return out.astype(np.float32)

    def normalize_state(self, x: Any) -> np.ndarray:
        """Raw state (..., D) -> normalised float32 (..., D); the stats are sliced to D."""
        return self._normalize(x, self.state, "state")

    def normalize_actions(self, x: Any) -> np.ndarray:
        """Raw (env-space, absolute or delta) actions (..., D) -> normalised float32 (..., D)."""
        return self._normalize(x, self.actions, "actions")

    # -- inverse ------------------------------------------------------------------------------------------------

    def _unnormalize(self, x: Any, stats: NormStats, dtype: Any) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        d = x.shape[-1]
        if self.mode == "zscore":
            mean = _pad_stat(stats.mean, d, 0.0).astype(np.float64)
            std = _pad_stat(stats.std, d, 1.0).astype(np.float64)
            out = x * (std + _EPS) + mean
        else:
            k = min(d, stats.dim)
            q01, q99 = stats.q01[:k].astype(np.float64), stats.q99[:k].astype(np.float64)
            head = (x[..., :k] + 1.0) / 2.0 * (q99 - q01 + _EPS) + q01
            out = np.concatenate([head, x[..., k:]], axis=-1)
        return out.astype(dtype)

    def unnormalize_actions(self, x: Any, dtype: Any = np.float32) -> np.ndarray:
        """Normalised actions (..., D) -> raw (..., D).

        Columns past the stats' width: z-score uses mean 0 / std 1 (so ``x * (1 + 1e-6)``), quantile passes them
        through unchanged, both as openpi's ``Unnormalize``.
        """
        return self._unnormalize(x, self.actions, dtype)

    def unnormalize_state(self, x: Any, dtype: Any = np.float32) -> np.ndarray:
        return self._unnormalize(x, self.state, dtype)


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------


def rotate_180(img: np.ndarray) -> np.ndarray:
    """``img[::-1, ::-1]`` on the (H, W) axes of an HWC (or HW) image, as a contiguous copy."""
    return np.ascontiguousarray(np.asarray(img)[::-1, ::-1])


PREPARED_IMAGES_KEY = "images_prepared"
"""Observation key that marks camera images prepared by the env: an observation holding it (True) has "agentview" and
"wrist" upright and at the policy's input size (:func:`prepare_camera_images`; LIBERO with
``LiberoEnvConfig.image_size``), which the policy uses as they are after checking their size. Without it (or False)
the images are raw renders, which the policy rotates and resizes. It travels with the images it describes: an
observation without images carries no flag."""


def _resize_with_pad_one(img: np.ndarray, height: int, width: int, method: int) -> np.ndarray:
    pil = Image.fromarray(img)
    cur_w, cur_h = pil.size
    if (cur_w, cur_h) == (width, height):
        return img
    ratio = max(cur_w / width, cur_h / height)
    new_h, new_w = int(cur_h / ratio), int(cur_w / ratio)
    resized = pil.resize((new_w, new_h), resample=method)
    canvas = Image.new(resized.mode, (width, height), 0)
    canvas.paste(resized, (max(0, int((width - new_w) / 2)), max(0, int((height - new_h) / 2))))
    return np.asarray(canvas)


def resize_with_pad(img: np.ndarray, height: int, width: int, method: int = Image.BILINEAR) -> np.ndarray:
    """openpi_client's ``resize_with_pad``: aspect-preserving PIL resize, centred on a black canvas.

    ``img`` is uint8 ``[..., H, W, C]`` (leading batch dims allowed) or a single ``(H, W)`` image. Float images are
    not accepted: openpi converts to uint8 before (``convert_to_uint8``) and PIL cannot resize float RGB.
    """
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"resize_with_pad expects a uint8 image, got {img.dtype}")
    if img.ndim == 2:
        return _resize_with_pad_one(img, height, width, method)
    if img.ndim < 3:
        raise ValueError(f"expected an image of shape [..., H, W, C], got {img.shape}")
    if img.shape[-3:-1] == (height, width):
        return img
    flat = img.reshape(-1, *img.shape[-3:])
    if flat.shape[-1] == 1:  # PIL has no (H, W, 1) mode
        out = np.stack([_resize_with_pad_one(im[..., 0], height, width, method)[..., None] for im in flat])
    else:
        out = np.stack([_resize_with_pad_one(im, height, width, method) for im in flat])
    return out.reshape(*img.shape[:-3], *out.shape[-3:])


def prepare_camera_images(agentview: np.ndarray, wrist: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw LIBERO renders (uint8 HWC, robosuite's OpenGL orientation) -> both upright (:func:`rotate_180`) and
    :func:`resize_with_pad`-ed to (size, size, 3) uint8: openpi's client-side steps 1-2, wherever they run (the
    policy's :meth:`LiberoTransforms.camera_images` or the env's ``LiberoEnvConfig.image_size``)."""
    return resize_with_pad(rotate_180(agentview), size, size), resize_with_pad(rotate_180(wrist), size, size)


_THREADS: ThreadPoolExecutor | None = None


def thread_map(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """`[fn(x) for x in items]` on up to 8 threads for batches of 4 or more: for per-observation image work whose
    PIL resizes release the GIL (in a lockstep rollout the env workers wait for the policy meanwhile, so their cores
    are free); results and their order are those of the plain loop. Measured on 2 cores, LIBERO's rotate + resize
    of 16 observations: 23.7 -> 13.9 ms. (The uint8 -> float conversion gained nothing from threads.)"""
    global _THREADS
    if len(items) < 4:
        return [fn(x) for x in items]
    if _THREADS is None:
        _THREADS = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="policy-inputs")
    return list(_THREADS.map(fn, items))


def image_to_model(img: np.ndarray) -> np.ndarray:
    """uint8 HWC -> float32 CHW in [-1, 1], ``x / 255 * 2 - 1`` in float32 as openpi's model does."""
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"image_to_model expects uint8, got {img.dtype}")
    x = img.astype(np.float32) / np.float32(255.0) * np.float32(2.0) - np.float32(1.0)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


# ----------------------------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------------------------


def quat2axisangle(quat_xyzw: Any) -> np.ndarray:
    """robosuite's ``quat2axisangle`` (xyzw quaternion -> axis * angle), float64 (3,); the input is not modified."""
    q = np.asarray(quat_xyzw, dtype=np.float64).reshape(4)
    w = min(max(float(q[3]), -1.0), 1.0)
    den = math.sqrt(1.0 - w * w)
    # robosuite / openpi use math.isclose(den, 0.0), i.e. den == 0 exactly; for float32/64 inputs with |w| < 1,
    # den >= ~1.5e-8, so np.isclose's 1e-8 tolerance would decide identically.
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return q[:3] * 2.0 * math.acos(w) / den


def libero_state(eef_pos: Any, eef_quat: Any, gripper_qpos: Any) -> np.ndarray:
    """The 8-dim LIBERO state: eef position (3), eef axis-angle (3), gripper finger positions (2); float32."""
    pos = np.asarray(eef_pos, dtype=np.float64).reshape(3)
    grip = np.asarray(gripper_qpos, dtype=np.float64).reshape(2)
    return np.concatenate([pos, quat2axisangle(eef_quat), grip]).astype(np.float32)


def pad_to_dim(x: np.ndarray, dim: int, value: float = 0.0) -> np.ndarray:
    """Pad the last axis to ``dim`` with ``value`` (unchanged when already at least ``dim`` wide)."""
    x = np.asarray(x)
    if x.shape[-1] >= dim:
        return x
    pad = [(0, 0)] * (x.ndim - 1) + [(0, dim - x.shape[-1])]
    return np.pad(x, pad, constant_values=value)


# ----------------------------------------------------------------------------------------------------------------
# The LIBERO pipeline
# ----------------------------------------------------------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float32).numpy()
    return np.asarray(x)


@dataclass
class LiberoTransforms:
    """openpi's LIBERO policy transforms, batched.

    ``mask_right_wrist``: True (default) masks out the absent right-wrist camera (image mask False), as openpi does
    for PI0 and PI0.5; False keeps its mask True, as openpi does for PI0-FAST.
    ``delta_actions``: openpi's ``extra_delta_transform`` (True for ``pi0_libero`` / ``pi0_fast_libero``, False
    for ``pi05_libero``).
    """

    normalizer: Normalizer
    model_action_dim: int = 32
    delta_actions: bool = True
    mask_right_wrist: bool = True
    image_size: int = 224
    action_dim: int = 7

    # -- client side --------------------------------------------------------------------------------------------

    def camera_images(
        self, agentview_uint8: np.ndarray, wrist_uint8: np.ndarray, prepared: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """LIBERO camera images -> upright uint8 (S, S, 3) images, S = ``image_size``: raw renders are rotated and
        resized (:func:`prepare_camera_images`); ``prepared`` ones (the env did that, ``PREPARED_IMAGES_KEY``) are
        returned as they are, after checking that they are S x S x 3 uint8 (a ``ValueError`` otherwise)."""
        s = self.image_size
        if not prepared:
            return prepare_camera_images(agentview_uint8, wrist_uint8, s)
        images = np.asarray(agentview_uint8), np.asarray(wrist_uint8)
        for name, image in zip(("agentview", "wrist"), images, strict=True):
            if image.shape != (s, s, 3) or image.dtype != np.uint8:
                raise ValueError(
                    f"the env prepared {name} images of shape {image.shape} ({image.dtype}), but the model takes "
                    f"{s}x{s}x3 uint8: build the env with image_size={s} (LiberoEnvConfig.image_size) or None"
                )
        return images

    # -- model inputs -------------------------------------------------------------------------------------------

    def normalized_state(self, raw_states: Any) -> np.ndarray:
        """Raw (B, 8) -> normalised and zero-padded (B, model_action_dim) float32."""
        return pad_to_dim(self.normalizer.normalize_state(raw_states), self.model_action_dim)

    def inputs(self, images: Sequence[tuple[np.ndarray, np.ndarray]] | np.ndarray, raw_states: Any) -> dict:
        """Batch of (agentview, wrist) uint8 HWC pairs, already at ``image_size`` (:meth:`camera_images` rotates and
        resizes them once, as openpi's ``ResizeImages``), and raw states -> model inputs."""
        import torch

        raw_states = np.asarray(raw_states)
        if raw_states.ndim != 2:
            raise ValueError(f"raw_states must be (B, D), got shape {raw_states.shape}")
        b = raw_states.shape[0]
        if len(images) != b:
            raise ValueError(f"got {len(images)} image pairs for {b} states")
        s = self.image_size
        base, wrist = [], []
        for pair in images:
            if len(pair) != 2:
                raise ValueError("each images entry must be an (agentview, wrist) pair")
            for image in pair:
                if np.shape(image)[-3:] != (s, s, 3):
                    raise ValueError(
                        f"images must be {s}x{s}x3 uint8 (camera_images resizes them), got {np.shape(image)}"
                    )
            base.append(image_to_model(np.asarray(pair[0])))
            wrist.append(image_to_model(np.asarray(pair[1])))
        base_t = torch.from_numpy(np.stack(base))
        # zeros_like(uint8 image) -> 0 / 255 * 2 - 1 = -1 everywhere.
        right_t = torch.full_like(base_t, -1.0)
        return {
            "images": {
                "base_0_rgb": base_t,
                "left_wrist_0_rgb": torch.from_numpy(np.stack(wrist)),
                "right_wrist_0_rgb": right_t,
            },
            "image_masks": {
                "base_0_rgb": torch.ones(b, dtype=torch.bool),
                "left_wrist_0_rgb": torch.ones(b, dtype=torch.bool),
                "right_wrist_0_rgb": torch.full((b,), not self.mask_right_wrist, dtype=torch.bool),
            },
            "state": torch.from_numpy(np.ascontiguousarray(self.normalized_state(raw_states))),
        }

    # -- model outputs ------------------------------------------------------------------------------------------

    def outputs(self, model_actions: Any, raw_states: Any) -> np.ndarray:
        """Normalised model actions (B, H, 32) -> env actions (B, H, action_dim) float32.

        Unnormalise, add the raw chunk-start state to the first 6 dims if ``delta_actions``, keep ``action_dim``.
        """
        actions = self.normalizer.unnormalize_actions(_to_numpy(model_actions), dtype=np.float64)
        raw_states = np.asarray(raw_states, dtype=np.float64)
        if actions.ndim != raw_states.ndim + 1:
            raise ValueError(f"model_actions {actions.shape} must be (B, H, D) for raw_states (B, D)")
        if self.delta_actions:
            actions[..., :_DELTA_DIMS] += raw_states[..., None, :_DELTA_DIMS]
        return np.ascontiguousarray(actions[..., : self.action_dim], dtype=np.float32)

    def actions_to_model(self, env_actions: Any, raw_states: Any) -> np.ndarray:
        """Inverse of :meth:`outputs`: env actions (B, H, action_dim) -> normalised, padded (B, H, 32) float32."""
        actions = np.array(_to_numpy(env_actions), dtype=np.float64)
        raw_states = np.asarray(raw_states, dtype=np.float64)
        if actions.ndim != raw_states.ndim + 1:
            raise ValueError(f"env_actions {actions.shape} must be (B, H, D) for raw_states (B, D)")
        if self.delta_actions:
            actions[..., :_DELTA_DIMS] -= raw_states[..., None, :_DELTA_DIMS]
        return pad_to_dim(self.normalizer.normalize_actions(actions), self.model_action_dim)
