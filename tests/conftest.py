"""Shared test fixtures: paths to the openpi reference fixtures in ../shared and converted copies of them."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pi0_lightning.demo import reference_observation
from pi0_lightning.model.observation import Observation, random_observation  # noqa: F401 (tests import it)

OPENPI_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "openpi"


@pytest.fixture(scope="session")
def openpi_fixtures() -> Path:
    if not OPENPI_FIXTURES.is_dir():
        pytest.skip(f"openpi reference fixtures not found at {OPENPI_FIXTURES} (clone the project beside ../shared)")
    return OPENPI_FIXTURES


@pytest.fixture(scope="session")
def converted(openpi_fixtures, tmp_path_factory):
    """name -> our checkpoint directory converted from the openpi fixture by `pi0-convert openpi` (cached)."""
    pytest.importorskip("tensorstore")
    from pi0_lightning.convert.cli import main

    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            out = tmp_path_factory.mktemp("converted") / name
            ref = np.load(openpi_fixtures / name / "reference.npz")
            argv = ["openpi", str(openpi_fixtures / name), str(out)]
            argv += ["--max-token-len", str(ref["tokenized_prompt"].shape[1])]
            assert main(argv) == 0
            cache[name] = out
        return cache[name]

    return get


observation_from_reference = reference_observation


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA device: skipped here, in one place, when there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_mlflow_uri(monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; undo it so no test (or its subprocesses) inherits
    another test's store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(autouse=True)
def _restore_float32_matmul_precision():
    """The benchmark entry points switch float32 matmuls to TF32 process-wide, as the CLI does; undo it after each
    test so that later tests comparing float32 paths (compiled against eager) see full float32 matmuls again."""
    precision, cudnn_tf32 = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(precision)
    torch.backends.cudnn.allow_tf32 = cudnn_tf32


# CPU installs have no Triton beside torch; `make install` puts one into the venv's triton-interpreter folder, used
# only by the subprocesses of `run_triton_interpreter`, so that the main environment's torch never sees it
INTERPRETER_TRITON = Path(sys.prefix) / "triton-interpreter"
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(
    not HAS_TRITON and not INTERPRETER_TRITON.is_dir(), reason=f"needs triton (importable or in {INTERPRETER_TRITON})"
)


def run_triton_interpreter(script: str) -> subprocess.CompletedProcess:
    """Run a Python script with Triton's CPU interpreter (kernels execute on the CPU with numpy)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    if not HAS_TRITON:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(INTERPRETER_TRITON), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)


def assert_kernels_match_in_compiled_graphs(model, obs: Observation, noise: torch.Tensor, path: str) -> None:
    """bf16 sampling on CUDA with the inference speed paths equals it with one of them (`path`, a `SpeedConfig`
    field) switched off, eager and as a compiled CUDA graph, to bf16 tolerance."""
    from pi0_lightning.model.speed import SpeedConfig, apply_speed_paths, disabled

    apply_speed_paths(model)
    with disabled(model, path):
        expected = model.sample_actions(obs, noise=noise, num_steps=3)
    eager = model.sample_actions(obs, noise=noise, num_steps=3)
    graphed = apply_speed_paths(model, SpeedConfig(compile=True, cuda_graphs=True))(obs, noise, 3)
    torch.testing.assert_close(eager, expected, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(graphed, eager, atol=5e-2, rtol=5e-2)
