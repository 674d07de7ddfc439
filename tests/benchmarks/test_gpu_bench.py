"""The GPU benchmark script: a CPU smoke run with the tiny model, the analytic FLOP count, and a CUDA run."""

from __future__ import annotations

import json

import pytest
import torch

from pi0_lightning.benchmarks.gpu import main, sample_flops
from pi0_lightning.model.config import PI0Config


@pytest.fixture
def one_thread():
    """The tiny model is overhead-bound: one thread is faster than oversubscribing a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cpu_smoke(one_thread, tmp_path, capsys):
    out = tmp_path / "gpu.json"
    argv = ["--device", "cpu", "--variant", "pi0_tiny", "--batches-infer", "1", "--batches-train", "2"]
    results = main([*argv, "--repeats", "1", "--out", str(out)])
    text = capsys.readouterr().out
    assert "matmul peak: n/a" in text
    assert "| batch | latency (ms, median) |" in text
    assert "| loss | trainable | act. ckpt | batch |" in text
    assert "| CFG / single |" in text
    assert "OOM" not in text
    for mode in ("full", "action_expert"):
        for ckpt in ("off", "on"):
            assert f"| cfg | {mode} | {ckpt} | 2 |" in text
    assert "| single | full | off | 2 |" in text and "| single | full | on | 2 |" in text

    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    (infer,) = results["inference"]
    assert infer["batch"] == 1 and infer["latency_ms"] > 0 and infer["frac_peak"] is None
    train = results["training"]
    assert len(train) == 6 and all(r["step_ms"] > 0 and r["peak_gib"] is None for r in train)
    by_mode = {r["mode"]: r["trainable_m"] for r in train}
    assert 0 < by_mode["action_expert"] < by_mode["full"]
    assert all(r["ratio"] > 0 for r in results["cfg_single_ratio"])


def test_sample_flops_scaling():
    cfg = PI0Config.variant("pi0")
    base, one, ten = (sample_flops(cfg, 1, steps) for steps in (0, 1, 10))
    assert 0 < base < one
    assert ten - base == 10 * (one - base)  # the suffix passes are linear in the number of Euler steps
    assert sample_flops(cfg, 8, 10) == 8 * ten
    assert sample_flops(cfg, 1, 10, cameras=2) < ten  # fewer image tokens, shorter prefix
    assert sample_flops(PI0Config.variant("pi0_tiny"), 1, 10) < ten / 1000


def test_sample_flops_real_pi0_range():
    # 2 * params * tokens: SigLIP So400m (~0.41B) on 3 * 256 tokens ~ 0.63 TFLOP; Gemma 2B without the embedding
    # (~1.98B) on 816 prefix tokens ~ 3.2 TFLOP; the 300M action expert on 51 tokens x 10 steps ~ 0.31 TFLOP.
    # Attention scores/values add ~0.2 TFLOP (mostly the 816-key prefix), so ~4.4 TFLOP; allow +-15%.
    flops = sample_flops(PI0Config.variant("pi0"), batch=1, num_steps=10)
    assert 3.7e12 < flops < 5.0e12
    # the ten suffix passes are under a tenth of the total: the prefix dominates one inference call
    assert flops - sample_flops(PI0Config.variant("pi0"), batch=1, num_steps=0) < 0.1 * flops


@pytest.mark.gpu
def test_real_pi0_on_cuda(capsys):
    argv = ["--variant", "pi0", "--batches-infer", "1", "--batches-train", "1", "--repeats", "3"]
    results = main(argv)
    text = capsys.readouterr().out
    assert torch.cuda.get_device_name() in text
    assert results["peak_tflops"] > 10
    (infer,) = results["inference"]
    assert 0 < infer["frac_peak"] < 1
    assert 3000 < results["params_m"] < 3600
    assert all(isinstance(r["step_ms"], float) for r in results["training"])  # batch 1 fits an 80 GB GPU


def test_fast_decode_cpu_smoke(one_thread, tmp_path, capsys):
    from pi0_lightning.benchmarks.fast_decode import main as fast_main

    out = tmp_path / "fast.json"
    argv = ["--device", "cpu", "--variant", "pi0_fast_micro", "--batches", "1", "--tokens", "4", "--modes", "eager"]
    results = fast_main([*argv, "--train-batches", "2", "--train-tokens", "3", "--repeats", "1", "--out", str(out)])
    text = capsys.readouterr().out
    assert "| mode | batch | tokens decoded | ms / chunk | ms / token |" in text and "LOOP step ms" in text
    (row,) = results["decode"]
    assert row["tokens"] == 4 and row["ms"] > 0 and results["loop_step"][0]["ms"] > 0
    assert json.loads(out.read_text())["variant"] == "pi0_fast_micro"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_profile_needs_cuda():
    from pi0_lightning.benchmarks.profile import main as profile_main

    with pytest.raises(SystemExit, match="needs a CUDA device"):
        profile_main([])
