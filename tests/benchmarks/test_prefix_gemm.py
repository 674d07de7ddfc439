"""The vision-tower GEMM benchmark: its tiled Triton GEMM (split K included) equals F.linear in Triton's CPU
interpreter, its sweep keeps to the grid sizes it promises, and its command line."""

from __future__ import annotations

import pytest
import torch
from conftest import needs_triton, run_triton_interpreter

from pi0_lightning.benchmarks.prefix_gemm import OPS, main, tiles

GEMM_SCRIPT = """
import torch
import torch.nn.functional as F
from pi0_lightning.benchmarks import prefix_gemm
g = torch.Generator().manual_seed(0)
for m, n, k in [(40, 96, 200), (70, 64, 128)]:  # ragged rows, columns and depth
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    for split in (1, 2, 3):
        y = prefix_gemm.tiled_linear(x, w, b, prefix_gemm.Tile(32, 64, 32, split, 4, 3))
        assert y.shape == (m, n) and y.dtype == x.dtype
        torch.testing.assert_close(y, F.linear(x, w, b), atol=1e-3, rtol=1e-3)
print("ok")
"""


@needs_triton
def test_tiled_gemm_equals_linear_with_and_without_split_k_in_the_interpreter():
    out = run_triton_interpreter(GEMM_SCRIPT)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.parametrize("quick", [False, True])
def test_sweep_grids_span_a_quarter_to_three_waves(quick):
    for k, n, _ in OPS.values():
        found = tiles(512, n, k, sms=132, quick=quick)
        assert found, (k, n)
        for t in found:
            programs = -(-512 // t.block_m) * -(-n // t.block_n) * t.split
            assert 33 <= programs <= 396 and -(-k // t.block_k) >= 4 * t.split, t
    assert len(tiles(512, 1152, 1152, 132, quick=True)) < len(tiles(512, 1152, 1152, 132, quick=False))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_needs_cuda():
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        main(["--quick"])


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sweep_on_cuda(capsys):
    rows = main(["--quick", "--ops", "fc2"])
    assert len(rows) == 1 and rows[0]["best_diff"] < 0.1 and rows[0]["tried"] > 0, rows
    assert "| fc2 | 4304 -> 1152 |" in capsys.readouterr().out
