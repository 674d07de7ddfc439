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
