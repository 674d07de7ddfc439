"""Read openpi (JAX / orbax) parameter checkpoints with tensorstore alone: no JAX, no orbax.

What an openpi ``params/`` directory is
---------------------------------------
openpi saves parameters with orbax's ``PyTreeCheckpointHandler`` in OCDBT mode. The item is ``{"params": tree}``,
where ``tree`` is a nested dict of arrays. The directory holds:

* ``_METADATA``: JSON. ``tree_metadata`` maps every leaf (keyed by the repr of its key tuple) to ``key_metadata``, a
  list of ``{"key": ..., "key_type": 1 (sequence index) | 2 (dict key)}``, and to ``value_metadata``. That has
  ``value_type`` (``"jax.Array"``, ``"np.ndarray"`` or ``"scalar"`` for arrays; ``"Dict"``, ``"List"``, ``"Tuple"``,
  ``"NamedTuple"`` or ``"None"`` for empty containers, which hold no data), ``skip_deserialize`` and ``write_shape``.
  The top level also has ``use_zarr3`` (which zarr version every array uses) and
  ``store_array_data_equal_to_fill_value``.
* ``manifest.ocdbt`` and ``d/``: the root of an OCDBT key-value database (a B-tree stored in files). Each process
  writes its own database under ``ocdbt.process_<i>/``. After the save, orbax merges their B-trees into the root one,
  whose nodes point at the value files under ``ocdbt.process_<i>/d/``. Opening the root database therefore reaches
  every key.
* ``_CHECKPOINT_METADATA`` (handler name, timestamps), ``_sharding`` (the JAX device placement of each leaf, keyed by
  the urlsafe-base64 of its name) and ``array_metadatas/process_<i>`` (write and chunk shapes). Reading does not need
  any of them.

Each leaf is one zarr array inside the database. Its name is the key path joined with ``"."``, for example
``params.PaliGemma.img.embedding.kernel``. Zarr v2 (the default, and what the openpi fixtures use) stores
``<name>/.zarray``, with a zstd compressor and ``"dimension_separator": "."``, plus chunks ``<name>/0.0.0``. bfloat16
is stored as the zarr v2 dtype ``"bfloat16"``. Zarr v3 (``use_zarr3``) stores ``<name>/zarr.json`` and chunks under
``<name>/c/...``. openpi training saves an ``nnx.State``, so every path there ends in an extra ``value`` component.
openpi's ``restore_params`` strips it, but only when every leaf has it, and this reader does the same.

Why tensorstore is enough
-------------------------
orbax does no array I/O of its own. It opens each leaf with the tensorstore spec
``{"driver": "zarr" | "zarr3", "kvstore": {"driver": "ocdbt", "base": <params dir>, "path": <name>}}`` and reads it.
JAX only decides on which devices the result lands. The tree structure is plain JSON. So the same spec, opened here
with ``tensorstore.open``, returns the stored values bit for bit, in their stored dtype (bfloat16 arrives as an
``ml_dtypes.bfloat16`` numpy array).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from .errors import ConversionError

__all__ = ["is_orbax_checkpoint", "read_openpi_params", "resolve_params_dir", "to_torch"]

_INSTALL_HINT = "pip install 'pi0-lightning[openpi]'"
_METADATA_FILE = "_METADATA"
_OCDBT_MANIFEST = "manifest.ocdbt"
_PARAMS_ITEM = "params"
_NNX_VALUE_SUFFIX = "value"
# orbax writes these value types for empty containers and None. They have no array data.
_EMPTY_VALUE_TYPES = frozenset({"None", "Dict", "List", "Tuple", "NamedTuple"})
# Zarr metadata key (the last component of a kvstore key) -> tensorstore driver.
_ZARR_METADATA_KEYS = {".zarray": "zarr", "zarr.json": "zarr3"}
# The B-tree nodes are shared by every leaf, so caching them avoids re-reading the root for each array. The pool is
# named so that it covers only the OCDBT kvstore: caching chunk data too would only hold a second copy of arrays
# that are read once.
_OCDBT_CACHE = "cache_pool#ocdbt"
_OCDBT_CACHE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class _Leaf:
    """One stored array: its full tree path (starting with ``params``), its storage name and its zarr driver."""

    path: tuple[str, ...]
    name: str
    driver: str


def is_orbax_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is an orbax params directory, or a checkpoint root that contains one."""
    try:
        resolve_params_dir(path)
    except ConversionError:
        return False
    return True


def resolve_params_dir(path: str | Path) -> Path:
    """Return the absolute ``params/`` directory for a checkpoint root or for the ``params/`` directory itself."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConversionError(f"checkpoint path does not exist: {path}")
    for candidate in (path / _PARAMS_ITEM, path):
        if _looks_like_params_dir(candidate):
            return candidate.resolve()
    raise ConversionError(f"{path} is not an openpi/orbax checkpoint directory (expected params/{_METADATA_FILE})")


def read_openpi_params(path: str | Path) -> dict[str, np.ndarray]:
    """Read every array under the ``params`` item of an openpi checkpoint.

    Args:
        path: the checkpoint root (containing ``params/``) or the ``params/`` directory itself.

    Returns:
        A dict from '/'-joined leaf paths, without the leading ``params`` and without a trailing nnx ``value``
        (e.g. ``PaliGemma/img/embedding/kernel``), to numpy arrays in their stored dtype. Keys are sorted.
    """
    ts = _import_tensorstore()
    params_dir = resolve_params_dir(path)
    use_ocdbt = (params_dir / _OCDBT_MANIFEST).is_file()
    context = ts.Context({_OCDBT_CACHE: {"total_bytes_limit": _OCDBT_CACHE_BYTES}})

    leaves = _leaves_from_metadata(params_dir)
    if leaves is None:
        # Without a tree in _METADATA, the database itself still names every array.
        leaves = _leaves_from_listing(ts, params_dir, context)
    keyed = _openpi_keys(leaves, params_dir)
    specs = {key: _array_spec(params_dir, leaf, use_ocdbt=use_ocdbt) for key, leaf in keyed.items()}
    return _read_arrays(ts, specs, keyed, params_dir, context)


def to_torch(arr: np.ndarray) -> torch.Tensor:
    """Convert a numpy array to a contiguous torch tensor that owns its memory, keeping bfloat16 bit-exact.

    numpy has no native bfloat16, and ``torch.from_numpy`` rejects the ``ml_dtypes`` one, so its 16-bit patterns are
    reinterpreted as int16 and viewed as ``torch.bfloat16``.
    """
    arr = np.asarray(arr)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype.name == "bfloat16":
        bits = np.array(arr, copy=True, order="C").view(np.int16)
        return torch.from_numpy(bits).view(torch.bfloat16)
    try:
        return torch.from_numpy(np.array(arr, copy=True, order="C"))
    except TypeError as err:
        raise ConversionError(f"cannot convert a numpy array of dtype {arr.dtype} to torch: {err}") from err


def _looks_like_params_dir(path: Path) -> bool:
    return path.is_dir() and ((path / _METADATA_FILE).is_file() or (path / _OCDBT_MANIFEST).is_file())


def _import_tensorstore() -> ModuleType:
    """Import tensorstore (and check ml_dtypes, which gives numpy its bfloat16), or explain how to install them."""
    try:
        import ml_dtypes  # noqa: F401
        import tensorstore
    except ImportError as err:
        raise ConversionError(
            f"reading openpi/orbax checkpoints needs tensorstore and ml_dtypes ({err}); install them with: "
            f"{_INSTALL_HINT}"
        ) from err
    return tensorstore


def _leaves_from_metadata(params_dir: Path) -> list[_Leaf] | None:
    """The array leaves listed in ``_METADATA``, or None when it has no tree to list."""
    metadata_path = params_dir / _METADATA_FILE
    if not metadata_path.is_file():
        return None
    try:
        metadata = json.loads(metadata_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(f"cannot parse {metadata_path}: {err}") from err
    tree = metadata.get("tree_metadata") if isinstance(metadata, dict) else None
    if not isinstance(tree, dict):
        return None

    driver = "zarr3" if metadata.get("use_zarr3", False) else "zarr"
    leaves = []
    for tree_key, entry in tree.items():
        try:
            path = tuple(str(k["key"]) for k in entry["key_metadata"])
            value = entry.get("value_metadata") or {}
        except (AttributeError, KeyError, TypeError) as err:
            raise ConversionError(f"malformed entry {tree_key!r} in {metadata_path}: {err}") from err
        if value.get("value_type") in _EMPTY_VALUE_TYPES or value.get("skip_deserialize", False):
            continue
        leaves.append(_Leaf(path=path, name=".".join(path), driver=driver))
    return leaves


def _leaves_from_listing(ts: ModuleType, params_dir: Path, context: Any) -> list[_Leaf]:
    """Find the arrays by listing the OCDBT database for zarr metadata keys (``<name>/.zarray``, ``<name>/zarr.json``).

    Names are split back into paths on ``"."``, which is ambiguous only if a key itself contains a dot; openpi's
    keys never do.
    """
    if not (params_dir / _OCDBT_MANIFEST).is_file():
        raise ConversionError(f"{params_dir} has neither a tree in {_METADATA_FILE} nor an OCDBT {_OCDBT_MANIFEST}")
    try:
        kvstore = ts.KvStore.open(_ocdbt_kvstore_spec(params_dir), context=context).result()
        keys = kvstore.list().result()
    except Exception as err:  # tensorstore raises plain ValueError/RuntimeError with a status message
        raise ConversionError(f"cannot list the OCDBT database in {params_dir}: {_short_ts_error(err)}") from err
    leaves = []
    for raw_key in keys:
        name, _, last = raw_key.decode().rpartition("/")
        if name and last in _ZARR_METADATA_KEYS:
            leaves.append(_Leaf(path=tuple(name.split(".")), name=name, driver=_ZARR_METADATA_KEYS[last]))
    return leaves


def _openpi_keys(leaves: list[_Leaf], params_dir: Path) -> dict[str, _Leaf]:
    """Key leaves as openpi's ``restore_params`` does: only the ``params`` item, with the nnx ``value`` stripped."""
    params = [leaf for leaf in leaves if len(leaf.path) > 1 and leaf.path[0] == _PARAMS_ITEM]
    if not params:
        raise ConversionError(f"{params_dir} has no arrays under a top-level {_PARAMS_ITEM!r} item")
    # Strip `value` only when every leaf has it, so a parameter that is really called `value` keeps its name.
    strip_value = all(len(leaf.path) > 2 and leaf.path[-1] == _NNX_VALUE_SUFFIX for leaf in params)
    keyed: dict[str, _Leaf] = {}
    for leaf in params:
        rel = leaf.path[1:-1] if strip_value else leaf.path[1:]
        keyed["/".join(rel)] = leaf
    return dict(sorted(keyed.items()))


def _ocdbt_kvstore_spec(params_dir: Path, name: str | None = None) -> dict[str, Any]:
    # A dict base, not a file:// URL, so paths with spaces, '#' or '%' need no escaping.
    spec: dict[str, Any] = {
        "driver": "ocdbt",
        "base": {"driver": "file", "path": f"{params_dir}/"},
        "cache_pool": _OCDBT_CACHE,
    }
    if name is not None:
        spec["path"] = f"{name}/"
    return spec


def _array_spec(params_dir: Path, leaf: _Leaf, *, use_ocdbt: bool) -> dict[str, Any]:
    if use_ocdbt:
        kvstore = _ocdbt_kvstore_spec(params_dir, leaf.name)
    else:
        # orbax without OCDBT writes each array as a plain directory `<params dir>/<name>/`.
        kvstore = {"driver": "file", "path": f"{params_dir / leaf.name}/"}
    # The checkpoint does not change while it is read, so cached metadata never needs re-validating.
    return {"driver": leaf.driver, "kvstore": kvstore, "recheck_cached_data": False, "recheck_cached_metadata": False}


def _read_arrays(
    ts: ModuleType,
    specs: dict[str, dict[str, Any]],
    leaves: dict[str, _Leaf],
    params_dir: Path,
    context: Any,
) -> dict[str, np.ndarray]:
    """Open every array, then read every array, with all futures in flight at once so tensorstore overlaps I/O."""
    opening = {key: ts.open(spec, context=context, open=True, read=True) for key, spec in specs.items()}
    reading = {key: _wait(future, key, leaves[key], params_dir).read() for key, future in opening.items()}
    return {key: _wait(future, key, leaves[key], params_dir) for key, future in reading.items()}


def _wait(future: Any, key: str, leaf: _Leaf, params_dir: Path) -> Any:
    try:
        return future.result()
    except Exception as err:  # tensorstore raises plain ValueError/RuntimeError with a status message
        raise ConversionError(
            f"cannot read leaf {key!r} (stored as {leaf.name!r}, {leaf.driver}) from {params_dir}: "
            f"{_short_ts_error(err)}"
        ) from err


def _short_ts_error(err: BaseException) -> str:
    # tensorstore appends the full JSON spec in brackets, which repeats what the message already names.
    return str(err).split(" [tensorstore_spec=", 1)[0]
