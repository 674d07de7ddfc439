"""The batch-1 A/B benchmark's command line (the measurement itself needs CUDA)."""

from __future__ import annotations

import pytest
import torch

from pi0_lightning.benchmarks.batch1 import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_needs_cuda():
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        main(["--variants", "default", "matmul-prefix"])


def test_rejects_unknown_variants():
    with pytest.raises(SystemExit):
        main(["--variants", "fastest"])
