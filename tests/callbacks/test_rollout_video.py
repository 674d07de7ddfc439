"""`RolloutVideoLogger`: one folder of mp4s per iteration under the run's videos directory."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from pi0_lightning.callbacks.rollout_video import RolloutVideoLogger
from pi0_lightning.rollout.types import EpisodeRequest, EpisodeResult


def test_videos_go_into_the_iteration_folder(tmp_path: Path) -> None:
    frames = [np.zeros((16, 16, 3), dtype=np.uint8)] * 3
    episode = EpisodeResult(EpisodeRequest(task_id=0, init_state=2, prompt="p"), frames=frames)
    # only the attributes the callback reads: a Trainer and a LightningModule are too heavy for this
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), is_global_zero=True, current_epoch=3, loggers=[])
    module = SimpleNamespace(val_episodes=[episode])
    callback = RolloutVideoLogger()
    callback.setup(trainer, module, "fit")  # type: ignore[arg-type]
    callback.on_validation_end(trainer, module)  # type: ignore[arg-type]
    videos = [p.relative_to(tmp_path) for p in tmp_path.rglob("*.mp4")]
    assert videos == [Path("videos/iteration_0003/task0_init2_fail.mp4")]


def _captured_frames(monkeypatch, trainer, module) -> list[np.ndarray]:
    import imageio.v2 as imageio

    written: list[np.ndarray] = []
    monkeypatch.setattr(imageio, "mimwrite", lambda path, frames, **kw: written.extend(frames))
    callback = RolloutVideoLogger()
    callback.setup(trainer, module, "fit")  # type: ignore[arg-type]
    callback.on_validation_end(trainer, module)  # type: ignore[arg-type]
    return written


def test_frames_from_env_prepared_images_are_not_turned_twice(tmp_path: Path, monkeypatch) -> None:
    """Raw renders (upside down) are flipped upright; frames the env prepared for the policy (rotated by 180 degrees,
    resized: the data module's `env_image_size`) end up with the same orientation, the raw video frame resized."""
    from pi0_lightning.evaluate import video_frame
    from pi0_lightning.policy.transforms import prepare_camera_images, resize_with_pad

    raw = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    raw[:8, :8] = 255  # a marker in the render's top-left corner: bottom-left in the upright view
    prepared, _ = prepare_camera_images(raw, raw, 32)
    request = EpisodeRequest(task_id=0, init_state=0, prompt="p")
    frames = {}
    for name, frame, size in (("raw", raw, None), ("prepared", prepared, 32)):
        trainer = SimpleNamespace(
            default_root_dir=str(tmp_path / name),
            is_global_zero=True,
            current_epoch=0,
            loggers=[],
            datamodule=SimpleNamespace(env_image_size=size),
        )
        module = SimpleNamespace(val_episodes=[EpisodeResult(request, frames=[frame])])
        (frames[name],) = _captured_frames(monkeypatch, trainer, module)
    np.testing.assert_array_equal(frames["raw"], raw[::-1])
    assert (frames["raw"][-8:, :8] == 255).all() and (frames["prepared"][-3:, :3] == 255).all()
    np.testing.assert_array_equal(frames["prepared"], resize_with_pad(frames["raw"], 32, 32))
    np.testing.assert_array_equal(frames["prepared"], video_frame(prepared, prepared=True))
