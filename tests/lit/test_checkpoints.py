"""Atomic checkpoint writes and the choice of the checkpoint a run resumes from."""

from __future__ import annotations

import errno
import os
import time

import pytest
import torch

from pi0_lightning.lit.checkpoints import (
    RESUME_KEY,
    AtomicCheckpointIO,
    CheckpointFileError,
    find_resume,
    read_checkpoint,
)


def lightning_like(epoch: int, iteration_end: bool = True, run_id: str | None = "abc") -> dict:
    return {
        "epoch": epoch,
        "global_step": 4 * (epoch + 1),
        "state_dict": {"w": torch.full((64, 64), float(epoch))},
        "mlflow": {"run_id": run_id, "tracking_uri": "sqlite:///x.db"},
        RESUME_KEY: {"iteration_end": iteration_end},
    }


def save(io: AtomicCheckpointIO, ckpt: dict, path, mtime: float) -> None:
    io.save_checkpoint(ckpt, path)
    os.utime(path, (mtime, mtime))


def test_atomic_save_keeps_the_old_file_when_the_disk_fills(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(lightning_like(0), path)
    before = path.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"\0" * 1000)  # part of the file reached the disk, then it filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint(lightning_like(1), path)
    assert path.read_bytes() == before  # the previous checkpoint is whole
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind
    assert read_checkpoint(path).epoch == 0


def test_saved_checkpoint_reads_back(tmp_path):
    path = tmp_path / "sub" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(lightning_like(3, run_id="r1"), path)
    info = read_checkpoint(path)
    assert (info.epoch, info.global_step, info.run_id, info.resumable) == (3, 16, "r1", True)


def test_resume_skips_truncated_and_mid_iteration_checkpoints(tmp_path):
    io = AtomicCheckpointIO()
    now = time.time()
    save(io, lightning_like(0), tmp_path / "iteration-0000.ckpt", now - 30)
    save(io, lightning_like(1), tmp_path / "iteration-0001.ckpt", now - 20)
    save(io, lightning_like(2, iteration_end=False), tmp_path / "best-0002.ckpt", now - 15)  # saved by validation
    save(io, lightning_like(2), tmp_path / "last.ckpt", now - 10)
    data = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "last.ckpt").write_bytes(data[: len(data) // 3])  # truncated by a crash of an older writer
    info, warnings = find_resume(tmp_path)
    assert info.path.name == "iteration-0001.ckpt" and info.epoch == 1
    assert len(warnings) == 1 and "last.ckpt" in warnings[0] and "damaged or incomplete" in warnings[0]


def test_no_resume_point(tmp_path):
    assert find_resume(tmp_path / "missing") == (None, [])
    (tmp_path / "last.ckpt").write_bytes(b"not a checkpoint")
    info, warnings = find_resume(tmp_path)
    assert info is None and len(warnings) == 1


def test_read_checkpoint_errors_are_one_line(tmp_path):
    with pytest.raises(CheckpointFileError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.ckpt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointFileError, match="not a Lightning checkpoint"):
        read_checkpoint(tmp_path / "plain.pt")
    (tmp_path / "junk.ckpt").write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointFileError) as e:
        read_checkpoint(tmp_path / "junk.ckpt")
    assert "\n" not in str(e.value)
