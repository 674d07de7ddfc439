"""The persistent-kernel feasibility benchmark: its chained GEMMs equal torch in Triton's CPU interpreter (one program
for the persistent variants, whose grid barrier needs every program resident at once), and its command line."""

from __future__ import annotations

import pytest
import torch
from conftest import needs_triton, run_triton_interpreter

from pi0_lightning.benchmarks.persistent import LayerChain, Shapes, main

CHAIN_SCRIPT = """
import torch
from pi0_lightning.benchmarks import persistent
shapes = persistent.Shapes(width=128, qkv=640, attn=512, mlp=512)
for variant, poll_loads in [(v, False) for v in persistent.VARIANTS] + [("persistent-all", True)]:
    chain = persistent.LayerChain(shapes, layers=2, rows=51, device=torch.device("cpu"), dtype=torch.float32)
    chain.poll_loads = poll_loads  # barrier polls as plain loads, then one acquiring atomic
    for _ in range(2):  # twice: the split-K outputs are zeroed by the chain and the barrier counters reset
        chain.reset()
        chain.run(variant)
        torch.testing.assert_close(chain.output, chain.reference(), atol=1e-4, rtol=1e-4)
    assert chain.count.abs().sum().item() == 0, (variant, chain.count)
# a barrier waiting for a program that is not resident (here: never launched) gives up and flags the run
chain = persistent.LayerChain(shapes, layers=1, rows=51, device=torch.device("cpu"), dtype=torch.float32)
chain.per_sm = 2  # two programs expected, one launched
chain.launch_persistent(0, 1, grid=1, spin_limit=5)
try:
    chain.check()
    raise AssertionError("check() did not raise")
except RuntimeError as e:
    assert "grid barrier timed out" in str(e)
chain.check()  # the flag was cleared with the error
print("ok")
"""


@needs_triton
def test_every_variant_computes_the_chain_and_a_stuck_barrier_gives_up_in_the_interpreter():
    out = run_triton_interpreter(CHAIN_SCRIPT)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_reference_chains_the_four_gemms():
    chain = LayerChain(Shapes(width=128, qkv=640, attn=512, mlp=512), 1, 5, torch.device("cpu"), torch.float32)
    qkv = chain.h0 @ chain.wqkv[0].T
    gu = (qkv[:, :512] @ chain.wo[0].T) @ chain.wgu[0].T
    torch.testing.assert_close(chain.reference(), gu[:, :512] @ chain.wd[0].T, atol=1e-4, rtol=1e-4)
    assert Shapes().weight_bytes == 2 * 17_301_504  # one PI0 action-expert layer's four GEMMs, bf16


def test_rejects_shapes_the_tiling_does_not_cover():
    with pytest.raises(ValueError, match="does not fit the tiling"):
        LayerChain(Shapes(width=128, qkv=640, attn=256, mlp=512), 1, 5, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="at most 64 rows"):
        LayerChain(Shapes(), 1, 65, torch.device("cpu"), torch.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_needs_cuda():
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        main(["--layers", "2"])


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_variant_on_cuda(capsys):
    """On a GPU the persistent variants run one or two programs per SM: the grid barrier orders the chain (bf16)."""
    rows = main(["--layers", "2", "--passes", "2", "--per-sm", "1", "2"])
    persistent = ["persistent-layer", "persistent-all", "persistent-all-prefetch"]
    expected = [("launches", None, None)] + [
        (v, per_sm, poll) for v in persistent for per_sm in (1, 2) for poll in ("atomic", "load")
    ]
    assert [(r["variant"], r["per_sm"], r["poll"]) for r in rows[:-1]] == expected
    assert rows[-1]["variant"] == "small_gemm"
    for r in rows[:-1]:
        assert r["max_abs_diff"] < 0.1 and r["us_per_layer_step"] > 0, r
    assert "| variant | programs per SM | barrier polls |" in capsys.readouterr().out
