"""Tests for the tensorstore-only openpi/orbax checkpoint reader.

Most tests read the tiny openpi reference checkpoints in /work/shared/fixtures/openpi (see its README.md). The zarr3,
non-OCDBT and edge-case layouts are not in the fixtures, so those tests write small checkpoints of their own with
tensorstore, following the layout documented in ``pi0_lightning.convert.orbax``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pi0_lightning.convert.errors import ConversionError
from pi0_lightning.convert.orbax import is_orbax_checkpoint, read_openpi_params, resolve_params_dir, to_torch

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "openpi"

needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"openpi reference fixtures not found at {FIXTURES}")


@pytest.fixture(scope="module")
def ts():
    return pytest.importorskip("tensorstore", reason="tensorstore is needed to read orbax checkpoints")


@pytest.fixture(scope="module")
def bfloat16() -> np.dtype:
    return np.dtype(pytest.importorskip("ml_dtypes").bfloat16)


@pytest.fixture(scope="module")
def pi0(ts) -> dict[str, np.ndarray]:
    return read_openpi_params(FIXTURES / "pi0_tiny" / "params")


@pytest.fixture(scope="module")
def pi05(ts) -> dict[str, np.ndarray]:
    return read_openpi_params(FIXTURES / "pi05_tiny" / "params")


@pytest.fixture(scope="module")
def fast(ts) -> dict[str, np.ndarray]:
    return read_openpi_params(FIXTURES / "pi0_fast_tiny" / "params")


def _writable_copy(src: Path, dst: Path) -> Path:
    """Copy a (read-only) fixture directory so a test can edit it and pytest can delete it."""
    shutil.copytree(src, dst)
    for path in (dst, *dst.rglob("*")):
        path.chmod(path.stat().st_mode | 0o200)
    return dst


def _write_checkpoint(
    ts, params_dir: Path, leaves: dict[tuple[str, ...], np.ndarray | None], *, use_zarr3: bool, use_ocdbt: bool
) -> Path:
    """Write an orbax-style params directory. A None value is recorded as an empty dict, which has no data."""
    params_dir.mkdir(parents=True)
    tree = {}
    for path, arr in leaves.items():
        value_type = "Dict" if arr is None else "np.ndarray"
        tree[repr(path)] = {
            "key_metadata": [{"key": key, "key_type": 2} for key in path],
            "value_metadata": {"value_type": value_type, "skip_deserialize": arr is None},
        }
        if arr is None:
            continue
        name = ".".join(path)
        if use_ocdbt:
            kvstore = {"driver": "ocdbt", "base": {"driver": "file", "path": f"{params_dir}/"}, "path": f"{name}/"}
        else:
            kvstore = {"driver": "file", "path": f"{params_dir / name}/"}
        spec = {"driver": "zarr3" if use_zarr3 else "zarr", "kvstore": kvstore, "dtype": arr.dtype.name}
        store = ts.open(spec, create=True, shape=arr.shape).result()
        store.write(arr).result()
    metadata = {"tree_metadata": tree, "use_zarr3": use_zarr3, "store_array_data_equal_to_fill_value": True}
    (params_dir / "_METADATA").write_text(json.dumps(metadata))
    return params_dir


# --- the openpi fixtures -------------------------------------------------------------------------------------------


@needs_fixtures
@pytest.mark.parametrize(
    ("model", "count", "n_params"),
    [("pi0_tiny", 50, 475_776), ("pi05_tiny", 51, 581_312), ("pi0_fast_tiny", 32, 4_174_592)],
)
def test_leaf_counts_and_sizes(ts, model: str, count: int, n_params: int) -> None:
    params = read_openpi_params(FIXTURES / model / "params")
    assert len(params) == count
    assert sum(arr.size for arr in params.values()) == n_params


@needs_fixtures
def test_pi0_shapes_and_dtypes(pi0: dict[str, np.ndarray]) -> None:
    assert pi0["PaliGemma/img/embedding/kernel"].shape == (14, 14, 3, 32)
    assert pi0["PaliGemma/llm/layers/attn/q_einsum/w"].shape == (4, 8, 64, 16)
    assert pi0["PaliGemma/llm/embedder/input_embedding"].shape == (1024, 64)
    assert pi0["state_proj/kernel"].shape == (32, 64)
    assert pi0["action_out_proj/kernel"].shape == (64, 32)
    assert "PaliGemma/llm/final_norm_1/scale" in pi0
    assert not any(key.startswith("params/") or key.endswith("/value") for key in pi0)
    assert {arr.dtype for arr in pi0.values()} == {np.dtype(np.float32)}


@needs_fixtures
def test_pi05_differs_from_pi0(pi05: dict[str, np.ndarray]) -> None:
    assert pi05["time_mlp_in/kernel"].shape == (64, 64)
    assert "time_mlp_out/bias" in pi05
    assert pi05["PaliGemma/llm/final_norm_1/Dense_0/kernel"].shape == (64, 192)
    assert pi05["PaliGemma/llm/layers/pre_attention_norm_1/Dense_0/bias"].shape == (4, 192)
    assert not any(key.startswith(("state_proj/", "action_time_mlp_")) for key in pi05)
    assert "PaliGemma/llm/final_norm_1/scale" not in pi05
    assert {arr.dtype for arr in pi05.values()} == {np.dtype(np.float32)}


@needs_fixtures
def test_fast_is_bfloat16(fast: dict[str, np.ndarray], bfloat16: np.dtype) -> None:
    assert {arr.dtype for arr in fast.values()} == {bfloat16}
    assert fast["PaliGemma/llm/embedder/input_embedding"].shape == (257_152, 16)
    assert all(key.startswith("PaliGemma/") for key in fast)
    assert not any(part.endswith("_1") for key in fast for part in key.split("/") if "norm" in part or "mlp" in part)


@needs_fixtures
def test_value_layout_gives_identical_arrays(pi0: dict[str, np.ndarray]) -> None:
    train_style = read_openpi_params(FIXTURES / "pi0_tiny" / "params_train_state_style")
    assert train_style.keys() == pi0.keys()
    for key, arr in pi0.items():
        assert train_style[key].dtype == arr.dtype, key
        assert np.array_equal(train_style[key], arr), key


@needs_fixtures
def test_root_and_params_dir_agree(pi0: dict[str, np.ndarray]) -> None:
    from_root = read_openpi_params(str(FIXTURES / "pi0_tiny"))
    assert from_root.keys() == pi0.keys()
    assert all(np.array_equal(from_root[key], arr) for key, arr in pi0.items())
    assert resolve_params_dir(FIXTURES / "pi0_tiny") == resolve_params_dir(FIXTURES / "pi0_tiny" / "params")


@needs_fixtures
def test_is_orbax_checkpoint(tmp_path: Path) -> None:
    assert is_orbax_checkpoint(FIXTURES / "pi0_tiny")
    assert is_orbax_checkpoint(FIXTURES / "pi0_fast_tiny" / "params")
    assert not is_orbax_checkpoint(FIXTURES / "pi0_tiny" / "assets")
    assert not is_orbax_checkpoint(FIXTURES / "pi0_tiny" / "config.json")
    assert not is_orbax_checkpoint(tmp_path)
    assert not is_orbax_checkpoint(tmp_path / "missing")


@needs_fixtures
def test_listing_fallback_without_metadata(ts, pi0: dict[str, np.ndarray], tmp_path: Path) -> None:
    params_dir = _writable_copy(FIXTURES / "pi0_tiny" / "params", tmp_path / "params")
    (params_dir / "_METADATA").unlink()
    listed = read_openpi_params(params_dir)
    assert listed.keys() == pi0.keys()
    assert all(np.array_equal(listed[key], arr) for key, arr in pi0.items())


@needs_fixtures
def test_unreadable_leaf_is_named(ts, tmp_path: Path) -> None:
    params_dir = _writable_copy(FIXTURES / "pi0_tiny" / "params", tmp_path / "params")
    metadata = json.loads((params_dir / "_METADATA").read_text())
    metadata["tree_metadata"][repr(("params", "ghost", "kernel"))] = {
        "key_metadata": [{"key": key, "key_type": 2} for key in ("params", "ghost", "kernel")],
        "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False, "write_shape": [2]},
    }
    (params_dir / "_METADATA").write_text(json.dumps(metadata))
    with pytest.raises(ConversionError, match=r"'ghost/kernel'.*params\.ghost\.kernel") as info:
        read_openpi_params(params_dir)
    assert str(params_dir) in str(info.value)
    assert "\n" not in str(info.value)


@needs_fixtures
def test_to_torch_on_fixture_is_exact(fast: dict[str, np.ndarray], pi0: dict[str, np.ndarray]) -> None:
    emb = fast["PaliGemma/llm/embedder/input_embedding"]
    tensor = to_torch(emb)
    assert tensor.dtype == torch.bfloat16
    assert torch.equal(tensor.float(), torch.from_numpy(emb.astype(np.float32)))
    kernel = pi0["PaliGemma/img/embedding/kernel"]
    assert torch.equal(to_torch(kernel), torch.from_numpy(kernel))


# --- errors --------------------------------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConversionError, match="does not exist") as info:
        read_openpi_params(missing)
    assert str(missing) in str(info.value)


@pytest.mark.parametrize("content", [{}, {"notes.txt": "hello", "weights.bin": "\x00\x01", "params/x.json": "{}"}])
def test_not_a_checkpoint(tmp_path: Path, content: dict[str, str]) -> None:
    for name, text in content.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    with pytest.raises(ConversionError, match=r"is not an openpi/orbax checkpoint directory \(expected params/_META"):
        read_openpi_params(tmp_path)
    with pytest.raises(ConversionError, match=str(tmp_path)):
        read_openpi_params(str(tmp_path))


def test_a_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x00" * 8)
    with pytest.raises(ConversionError, match=str(path)):
        read_openpi_params(path)


def test_corrupt_metadata(ts, tmp_path: Path) -> None:
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "_METADATA").write_text("{not json")
    with pytest.raises(ConversionError, match=r"cannot parse .*_METADATA"):
        read_openpi_params(tmp_path)


def test_conversion_error_is_one_line() -> None:
    err = ConversionError("cannot read leaf 'a/b':\nNOT_FOUND: missing\n  details")
    assert str(err) == "cannot read leaf 'a/b': NOT_FOUND: missing details"


def test_missing_tensorstore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorstore", None)  # makes `import tensorstore` raise ImportError
    with pytest.raises(ConversionError, match=r"pip install 'pi0-lightning\[openpi\]'"):
        read_openpi_params(tmp_path)


# --- layouts the fixtures do not cover -----------------------------------------------------------------------------


@pytest.mark.parametrize(("use_zarr3", "use_ocdbt"), [(True, True), (False, False), (True, False)])
def test_other_storage_layouts(ts, bfloat16: np.dtype, tmp_path: Path, use_zarr3: bool, use_ocdbt: bool) -> None:
    rng = np.random.default_rng(0)
    leaves = {
        ("params", "dense", "kernel"): rng.standard_normal((3, 5)).astype(np.float32),
        ("params", "dense", "bias"): rng.standard_normal(5).astype(bfloat16),
        ("params", "layers", "0", "scale"): np.arange(4, dtype=np.int32),
    }
    params_dir = _write_checkpoint(ts, tmp_path / "params", leaves, use_zarr3=use_zarr3, use_ocdbt=use_ocdbt)
    params = read_openpi_params(tmp_path)
    assert params.keys() == {"dense/kernel", "dense/bias", "layers/0/scale"}
    for path, arr in leaves.items():
        got = params["/".join(path[1:])]
        assert got.dtype == arr.dtype
        assert np.array_equal(got, arr)
    assert is_orbax_checkpoint(params_dir)


def test_value_suffix_stripped_only_when_on_every_leaf(ts, tmp_path: Path) -> None:
    one = np.ones(2, dtype=np.float32)
    mixed = {("params", "attn", "value"): one, ("params", "attn", "query"): one}
    _write_checkpoint(ts, tmp_path / "mixed" / "params", mixed, use_zarr3=False, use_ocdbt=True)
    assert read_openpi_params(tmp_path / "mixed").keys() == {"attn/value", "attn/query"}

    nnx = {("params", "attn", "value", "value"): one, ("params", "attn", "query", "value"): one}
    _write_checkpoint(ts, tmp_path / "nnx" / "params", nnx, use_zarr3=False, use_ocdbt=True)
    assert read_openpi_params(tmp_path / "nnx").keys() == {"attn/value", "attn/query"}


def test_only_the_params_item_is_read_and_empty_nodes_are_skipped(ts, tmp_path: Path) -> None:
    one = np.ones(2, dtype=np.float32)
    leaves = {("params", "w"): one, ("params", "empty"): None, ("opt_state", "mu"): one}
    _write_checkpoint(ts, tmp_path / "params", leaves, use_zarr3=False, use_ocdbt=True)
    assert read_openpi_params(tmp_path).keys() == {"w"}


def test_no_params_item(ts, tmp_path: Path) -> None:
    leaves = {("opt_state", "mu"): np.ones(2, dtype=np.float32)}
    _write_checkpoint(ts, tmp_path / "params", leaves, use_zarr3=False, use_ocdbt=True)
    with pytest.raises(ConversionError, match="no arrays under a top-level 'params' item"):
        read_openpi_params(tmp_path)


# --- to_torch ------------------------------------------------------------------------------------------------------


def test_to_torch_bfloat16_is_bit_exact(bfloat16: np.dtype) -> None:
    # Every 16-bit pattern, which covers signed zeros, subnormals, infinities and NaN payloads.
    bits = np.arange(-(2**15), 2**15, dtype=np.int32).astype(np.int16)
    arr = bits.view(bfloat16).reshape(256, 256)
    tensor = to_torch(arr)
    assert tensor.dtype == torch.bfloat16
    assert tensor.shape == (256, 256)
    assert np.array_equal(tensor.view(torch.int16).numpy(), bits.reshape(256, 256))
    finite = np.isfinite(arr.astype(np.float32))
    assert np.array_equal(tensor.float().numpy()[finite], arr.astype(np.float32)[finite])


def test_to_torch_copies_into_contiguous_memory(bfloat16: np.dtype) -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    for source in (arr.T, arr.astype(bfloat16).T, arr.astype(">f4")):
        tensor = to_torch(source)
        assert tensor.is_contiguous()
        assert torch.equal(tensor.float(), torch.from_numpy(np.ascontiguousarray(source.astype(np.float32))))
    tensor = to_torch(arr)
    arr[0, 0] = 100.0
    assert tensor[0, 0].item() == 0.0
    assert to_torch(np.array([1, 2], dtype=np.int64)).dtype == torch.int64
