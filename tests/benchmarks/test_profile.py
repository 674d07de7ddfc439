"""The kernel profile's prefix / denoising-step split, on a synthetic trace (the profile itself needs CUDA)."""

from __future__ import annotations

import json

import pytest
import torch

from pi0_lightning.benchmarks.profile import kernel_timeline, main, phase_breakdown


def test_phase_breakdown_splits_at_the_first_denoising_kernel(tmp_path):
    events = [  # out of order on purpose, plus a non-kernel event
        {"cat": "kernel", "name": "_partial_attention", "ts": 30.0, "dur": 7.0},
        {"cat": "kernel", "name": "nvjet_gemm", "ts": 0.0, "dur": 50.0},
        {"cat": "cpu_op", "name": "aten::mm", "ts": 1.0, "dur": 99.0},
        {"cat": "kernel", "name": "_small_linear", "ts": 20.0, "dur": 9.0},
        {"cat": "kernel", "name": "_small_linear", "ts": 40.0, "dur": 11.0},
        {"cat": "kernel", "name": "triton_poi_fused_rope", "ts": 25.0, "dur": 1.5},
    ]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    kernels = kernel_timeline(trace)
    assert [k[0] for k in kernels] == ["nvjet_gemm", "_small_linear", "triton_poi_fused_rope", "_partial_attention",
                                       "_small_linear"]  # fmt: skip
    table = phase_breakdown(kernels, layer_steps=2)
    assert "| prefix | 1 | 0.05 |" in table
    assert "| denoising steps | 4 | 0.03 |" in table
    assert "| _small_linear | 2 | 10.00 | 10.00 |" in table  # 20 us over 2 layer steps
    assert table.index("_small_linear") < table.index("_partial_attention") < table.index("triton_poi_fused_rope")


def test_phase_breakdown_without_fused_gemms_splits_after_the_prefix_attention():
    depth = 2  # layers: the prefix pass runs 2 attention kernels, every denoising step 2 more
    names = ["gemm", "_partial_attention", "gemm", "_partial_attention", "norm", "gemm", "_partial_attention", "gemm"]
    kernels = [(name, float(i), 1.0) for i, name in enumerate(names)]
    table = phase_breakdown(kernels, layer_steps=depth * 10)
    assert "| prefix | 6 | 0.01 |" in table  # up to the first denoising step's attention
    assert "| denoising steps | 2 | 0.00 |" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_needs_cuda():
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        main([])
