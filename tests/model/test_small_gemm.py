"""Fused few-row GEMMs (RMSNorm before, GeGLU or residual after) equal the unfused layers (Triton interpreter, CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_kernels_match_in_compiled_graphs, needs_triton, random_observation, run_triton_interpreter

from pi0_lightning.model import small_gemm
from pi0_lightning.model.config import PI0Config
from pi0_lightning.model.pi0 import PI0
from pi0_lightning.model.speed import SpeedConfig, apply_speed_paths, disabled

OPS_SCRIPT = """
import torch, torch.nn.functional as F
from pi0_lightning.model import small_gemm
torch.manual_seed(0)
close = dict(atol=1e-5, rtol=1e-5)  # float32: the interpreter mis-handles bf16 dots
x, w2, res = torch.randn(2, 5, 256), torch.randn(48, 256) * 0.1, torch.randn(2, 5, 24)
w = w2[:24]
gate, up = F.linear(x, w2).chunk(2, -1)
geglu = F.gelu(gate, approximate="tanh") * up
residual_gate = torch.randn(2, 1, 24)  # PI0.5: one gate per batch element
norm_weight = torch.randn(256) * 0.3
x32 = x.float()
normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + norm_weight)  # gemma.RMSNorm
folded = w2 * (1 + norm_weight)  # FusedWeight's norm_weight
n_gate, n_up = F.linear(normed, w2).chunk(2, -1)
with torch.no_grad():
    # K in one program, and split over 2 and 4: the last program to arrive sums the partials, then the epilogue
    for split in (1, 2, 4):
        tile = small_gemm.Tiling(block_n=16, block_k=32, split=split)
        torch.testing.assert_close(small_gemm.linear(x, w, tile=tile), F.linear(x, w), **close)
        torch.testing.assert_close(small_gemm.linear(x, w, residual=res, tile=tile), res + F.linear(x, w), **close)
        out = small_gemm.linear(x, w, residual=res, residual_gate=residual_gate, tile=tile)
        torch.testing.assert_close(out, res + F.linear(x, w) * residual_gate, **close)
        torch.testing.assert_close(small_gemm.linear(x, w2, geglu=True, tile=tile), geglu, **close)
        out = small_gemm.linear(x, folded[:24], rms_eps=1e-6, tile=tile)
        torch.testing.assert_close(out, F.linear(normed, w), **close)
        out = small_gemm.linear(x, folded, rms_eps=1e-6, geglu=True, tile=tile)
        torch.testing.assert_close(out, F.gelu(n_gate, approximate="tanh") * n_up, **close)
    torch.testing.assert_close(small_gemm.linear(x[:, :, :40], w[:, :40]), F.linear(x[:, :, :40], w[:, :40]), **close)
counters = small_gemm._WORKSPACES[torch.device("cpu")][1]
assert counters.abs().sum().item() == 0, counters  # every tile's counter is back at zero for the next call
print("ok")
"""

SAMPLE_SCRIPT = """
import torch
from conftest import random_observation
from pi0_lightning.model import small_gemm
from pi0_lightning.model.config import PI0Config
from pi0_lightning.model.pi0 import PI0
from pi0_lightning.model.speed import apply_speed_paths, disabled
torch.manual_seed(0)
model = PI0(PI0Config.variant(VARIANT, action_horizon=6)).eval()
obs, noise = random_observation(model.config), torch.randn(2, 6, 32)
with torch.no_grad():
    apply_speed_paths(model)
    expected = model.sample_actions(obs, noise=noise, num_steps=3)  # on the CPU: the unfused path
    small_gemm.usable = lambda x: True  # the interpreter runs the kernels on the CPU
    calls, linear = [], small_gemm.linear
    small_gemm.linear = lambda *a, **kw: calls.append(1) or linear(*a, **kw)
    out = model.sample_actions(obs, noise=noise, num_steps=3)
per_step = 4 if VARIANT == "pi0_tiny" else 3  # PI0.5's adaptive norms are not folded into the q/k/v GEMM
assert len(calls) == per_step * len(model.llm.layers) * 3, len(calls)
torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
with torch.no_grad():  # in-place updates, as an optimizer step makes them: the stacked and folded copies follow
    for layer in model.llm.layers:
        expert = layer.experts[1]
        if expert.attn_norm.weight is not None:  # PI0's plain norms, folded into the GEMMs' weights
            expert.attn_norm.weight.add_(0.5)
            expert.ffn_norm.weight.sub_(0.3)
        else:  # PI0.5's adaptive norms start with zero residual gates: open them
            expert.attn_norm.dense.bias.add_(0.5)
            expert.ffn_norm.dense.bias.add_(0.5)
        expert.mlp.gate_proj.weight.mul_(1.5)
    updated = model.sample_actions(obs, noise=noise, num_steps=3)
    with disabled(model, "small_gemm"):
        expected_updated = model.sample_actions(obs, noise=noise, num_steps=3)
assert (expected_updated - expected).abs().max() > 1e-3  # the update matters
torch.testing.assert_close(updated, expected_updated, atol=1e-5, rtol=1e-5)
print("ok")
"""


@needs_triton
@pytest.mark.parametrize(
    "script",
    [OPS_SCRIPT, SAMPLE_SCRIPT.replace("VARIANT", "'pi0_tiny'"), SAMPLE_SCRIPT.replace("VARIANT", "'pi05_tiny'")],
    ids=["ops", "pi0", "pi05"],
)
def test_fused_gemms_equal_the_unfused_path_in_the_interpreter(script):
    tests = str(Path(__file__).resolve().parents[1])  # for conftest's random_observation
    out = run_triton_interpreter(f"import sys; sys.path.insert(0, {tests!r})\n" + script)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def _tiny(variant="pi0_tiny"):
    torch.manual_seed(0)
    model = PI0(PI0Config.variant(variant, action_horizon=6)).eval()
    return model, random_observation(model.config), torch.randn(2, 6, 32)


def _tiny_bf16_cuda():
    model, obs, noise = _tiny()
    return model.to("cuda").apply_dtype_policy("bfloat16"), obs.to("cuda"), noise.to("cuda")


def test_dispatch_only_at_inference_with_stacked_weights(monkeypatch):
    calls = []
    monkeypatch.setattr(small_gemm, "usable", lambda x: True)
    real = small_gemm.linear
    monkeypatch.setattr(small_gemm, "linear", lambda *a, **kw: calls.append(kw) or _unfused(real, *a, **kw))
    model, obs, noise = _tiny()
    with torch.no_grad():
        model.sample_actions(obs, noise=noise, num_steps=2)  # not installed: the reference layers
        apply_speed_paths(model, SpeedConfig(fused_projections=False))
        model.sample_actions(obs, noise=noise, num_steps=2)  # not stacked: no stacked weights to run on
        assert calls == []
        apply_speed_paths(model)
        model.sample_actions(obs, noise=noise, num_steps=2)
    assert len(calls) == 4 * len(model.llm.layers) * 2  # 4 GEMMs per layer and denoising step, never the prefix
    model.train()
    model(obs, torch.randn(2, 6, 32)).mean().backward()  # training: the separate layers
    assert len(calls) == 4 * len(model.llm.layers) * 2
    pi05, obs05, noise05 = _tiny("pi05_tiny")
    with torch.no_grad():
        apply_speed_paths(pi05)
        pi05.sample_actions(obs05, noise=noise05, num_steps=2)  # adaptive norms too
    assert len(calls) == 4 * len(model.llm.layers) * 2 + 3 * len(pi05.llm.layers) * 2  # adaptive norms: 3


def _unfused(real, x, weight, *, rms_eps=None, geglu=False, residual=None, residual_gate=None):
    """The reference arithmetic of `small_gemm.linear`, in torch (for the CPU dispatch test)."""
    y = torch.nn.functional.linear(x, weight)
    if rms_eps is not None:
        y = y * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + rms_eps)
    if geglu:
        gate, up = y.chunk(2, -1)
        y = torch.nn.functional.gelu(gate, approximate="tanh") * up
    if residual_gate is not None:
        y = y * residual_gate
    return y + residual if residual is not None else y


@pytest.mark.gpu
@needs_triton
def test_bf16_sampling_with_fused_gemms_in_compiled_graphs():
    model, obs, noise = _tiny_bf16_cuda()
    assert_kernels_match_in_compiled_graphs(model, obs, noise, "small_gemm")


@pytest.mark.gpu
@needs_triton
def test_graph_replay_with_fused_gemms_follows_weight_and_norm_updates():
    model, obs, noise = _tiny_bf16_cuda()
    sampler = apply_speed_paths(model, SpeedConfig(cuda_graphs=True))
    stack = model.llm.layers[0].stacks[1]
    assert stack.folded_qkv is not None and stack.folded_gate_up is not None
    before = sampler(obs, noise, 3)  # captured with the norm-folded copies
    with torch.no_grad():  # in-place updates, as an optimizer step makes them: the copies must follow
        for layer in model.llm.layers:
            layer.experts[1].attn_norm.weight.add_(0.5)
            layer.experts[1].ffn_norm.weight.sub_(0.3)
            layer.experts[1].mlp.gate_proj.weight.mul_(1.5)
    replay = sampler(obs, noise, 3)
    with disabled(model, "small_gemm"):
        expected = model.sample_actions(obs, noise=noise, num_steps=3)
    assert (expected - before).abs().max() > 0.1  # the update matters
    torch.testing.assert_close(replay, expected, atol=5e-2, rtol=5e-2)
