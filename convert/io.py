"""Output helpers: write a directory or a file completely or not at all.

A conversion writes several files (weights, config, norm stats). If it fails half way, a directory holding some of
them would look like a finished checkpoint. So the files go into a temporary sibling directory first, and it is
renamed into place only after everything is written. A rename within one parent directory is atomic on POSIX.
Single files (Lightning checkpoints, norm stats, bundles) go the same way through a temporary sibling file, fsynced
before the rename so that a crash or a full disk never leaves a truncated file under the final name.
"""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConversionError

__all__ = ["atomic_output_dir", "atomic_output_file"]


@contextmanager
def atomic_output_dir(out_dir: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes ``out_dir`` when the ``with`` block succeeds.

    The temporary directory is created in ``out_dir``'s parent, so the final rename is atomic. If the block raises,
    the temporary directory and any parent directories created for it are removed, and the exception propagates.

    Args:
        out_dir: the final directory. Missing parent directories are created.
        overwrite: if false, an existing non-empty ``out_dir`` is an error, raised before anything is created. If
            true, the old directory is replaced, but only once the new one is complete.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    _check_target(out_dir, overwrite=overwrite)
    created_parents = _make_parents(out_dir.parent)
    # mkdir (not tempfile.mkdtemp, which forces mode 0o700) so the result gets the usual umask permissions.
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        tmp_dir.mkdir()
        yield tmp_dir
        _apply_umask_modes(tmp_dir)
        _replace_dir(tmp_dir, out_dir)
    except BaseException:
        # BaseException too, so Ctrl-C does not leave a half-written directory behind.
        shutil.rmtree(tmp_dir, ignore_errors=True)
        _remove_empty_dirs(created_parents)
        raise


@contextmanager
def atomic_output_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; when the ``with`` block succeeds it is fsynced and renamed to
    ``path`` (an existing file stays whole until then), and the directory entry is fsynced too. If the block raises,
    the temporary file is removed and the exception propagates. Missing parent directories are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_target(out_dir: Path, *, overwrite: bool) -> None:
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ConversionError(f"output path {out_dir} exists and is not a directory")
    if out_dir.is_dir() and not overwrite and any(out_dir.iterdir()):
        raise ConversionError(f"output directory {out_dir} exists and is not empty (use overwrite to replace it)")


def _apply_umask_modes(root: Path) -> None:
    """Give ``root`` and everything below it the modes a plain ``mkdir`` / ``open`` would have under the umask.

    Some writers create owner-only files (safetensors' ``save_file`` writes through a private temporary file, so
    ``model.safetensors`` would be 0o600 beside a 0o644 ``config.json``); renamed into place as they are, the
    checkpoint could not be read by other users or a shared cache.
    """
    umask = os.umask(0)
    os.umask(umask)  # restored at once: reading the umask is only possible by setting it
    dir_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask
    for dirpath, _, filenames in os.walk(root):  # does not descend into symlinked directories
        os.chmod(dirpath, dir_mode)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):  # chmod would change the link's target, which may lie outside root
                os.chmod(path, file_mode)


def _make_parents(parent: Path) -> list[Path]:
    """Create ``parent`` and its missing ancestors, returning the ones created, deepest first."""
    missing = []
    for directory in (parent, *parent.parents):
        if directory.exists():
            break
        missing.append(directory)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConversionError(f"cannot create output parent directory {parent}: {err}") from err
    return missing


def _replace_dir(new_dir: Path, out_dir: Path) -> None:
    """Move ``new_dir`` to ``out_dir``, replacing an existing ``out_dir`` only after the move can no longer fail."""
    if not out_dir.exists():
        new_dir.rename(out_dir)
        return
    # Renaming onto a non-empty directory fails, so move the old one aside first and put it back if the swap fails.
    old_dir = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:12]}"
    out_dir.rename(old_dir)
    try:
        new_dir.rename(out_dir)
    except BaseException:
        old_dir.rename(out_dir)
        raise
    try:
        shutil.rmtree(old_dir)
    except OSError as err:
        # The new directory is already in place, so this is not worth failing the conversion for.
        warnings.warn(f"could not remove the replaced directory {old_dir}: {err}", stacklevel=2)


def _remove_empty_dirs(directories: list[Path]) -> None:
    for directory in directories:  # deepest first, so each one is empty once its child is gone
        try:
            directory.rmdir()
        except OSError:
            return
