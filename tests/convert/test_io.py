"""Tests for ``atomic_output_dir``: a converted directory appears complete or not at all."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from pi0_lightning.convert.errors import ConversionError
from pi0_lightning.convert.io import atomic_output_dir


class _Boom(Exception):
    pass


def _listing(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


def test_success_renames_into_place(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "out"
    with atomic_output_dir(out) as tmp:
        assert tmp.is_dir() and tmp.parent == out.parent and not any(tmp.iterdir())
        assert not out.exists()
        (tmp / "model.safetensors").write_text("weights")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text("{}")
    assert (out / "model.safetensors").read_text() == "weights"
    assert (out / "sub" / "config.json").read_text() == "{}"
    assert not tmp.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_failure_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    before = _listing(tmp_path)
    with pytest.raises(_Boom), atomic_output_dir(tmp_path / "new" / "parents" / "out") as tmp:
        (tmp / "half_written.bin").write_text("partial")
        raise _Boom
    assert _listing(tmp_path) == before


def test_keyboard_interrupt_also_cleans_up(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("partial")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_refuses_non_empty_directory_before_doing_anything(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    entered = False
    with pytest.raises(ConversionError, match="exists and is not empty") as info, atomic_output_dir(out):
        entered = True
    assert not entered
    assert str(out) in str(info.value)
    assert _listing(tmp_path) == {"out", "out/old.txt"}


def test_refuses_a_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("not a dir")
    with pytest.raises(ConversionError, match="not a directory"), atomic_output_dir(out, overwrite=True):
        pass
    assert out.read_text() == "not a dir"


def test_existing_empty_directory_is_fine(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with atomic_output_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _listing(tmp_path) == {"out", "out/new.txt"}


def test_overwrite_replaces_old_directory(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_output_dir(out, overwrite=True) as tmp:
        # The old contents stay in place until the new directory is complete.
        assert (out / "old.txt").read_text() == "old"
        (tmp / "new.txt").write_text("new")
    assert _listing(tmp_path) == {"out", "out/new.txt"}


def test_failed_overwrite_keeps_old_directory(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(_Boom), atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise _Boom
    assert _listing(tmp_path) == {"out", "out/old.txt"}


def test_accepts_str_path(tmp_path: Path) -> None:
    with atomic_output_dir(str(tmp_path / "out")) as tmp:
        assert isinstance(tmp, Path)
    assert (tmp_path / "out").is_dir()


def test_result_gets_normal_directory_permissions(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    reference.mkdir()
    with atomic_output_dir(tmp_path / "out"):
        pass
    assert (tmp_path / "out").stat().st_mode == reference.stat().st_mode


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.mark.usefixtures("umask_022")
def test_saved_checkpoint_gets_umask_modes(tmp_path: Path) -> None:
    # safetensors writes model.safetensors through an owner-only temporary file, unlike config.json
    from pi0_lightning.checkpoint import save_pretrained
    from pi0_lightning.model.config import PI0Config
    from pi0_lightning.model.pi0 import PI0

    out = save_pretrained(PI0(PI0Config.variant("pi0_tiny")), tmp_path / "ckpt", norm_stats={"norm_stats": {}})
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for name in ("model.safetensors", "config.json", "norm_stats.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
