"""The Triton attention kernel equals the reference attention (Triton's CPU interpreter, and CUDA)."""

from __future__ import annotations

import inspect
import textwrap

import pytest
import torch
from conftest import assert_kernels_match_in_compiled_graphs, needs_triton, run_triton_interpreter

from pi0_lightning.model import attention_kernel as kernels
from pi0_lightning.model import gemma


def _case(dtype, device, b=2, h=8, kv=1, t=51, s=300, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, d, generator=g).transpose(1, 2)  # the model's layout: a transposed view
    k, v = torch.randn(b, kv, s, d, generator=g), torch.randn(b, kv, s, d, generator=g)
    allowed = torch.rand(b, t, s, generator=g) > 0.3
    allowed[-1, min(3, t - 1)] = False  # a fully masked row: uniform over all keys, as openpi's finite mask gives
    allowed[0, :, 130:260] = False  # whole key chunks masked for every row of one element
    mask = gemma.additive_mask(allowed, dtype)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v)] + [mask.to(device)]


@needs_triton
def test_kernel_matches_matmul_attention_in_the_interpreter():
    # Triton's interpreter runs the kernels on the CPU with numpy; it mis-handles bf16 dots, so float32 here
    script = (
        "import torch\nfrom pi0_lightning.model import gemma\n"
        + "from pi0_lightning.model import attention_kernel as kernels\n"
        + inspect.getsource(_case)
    )
    script += textwrap.dedent(
        """
        def check(kv, **shape):
            q, k, v, mask = _case(torch.float32, "cpu", kv=kv, **shape)
            with torch.no_grad():
                expected = gemma.attention(q, k, v, mask, kv)
            close = dict(atol=2e-6, rtol=1e-5)
            torch.testing.assert_close(kernels.cached_attention(q, k, v, mask, kv), expected, **close)
            for cut in (1, 129, k.shape[2] - 7):  # cache + new keys read in place, cut anywhere
                out = kernels.cached_attention(q, k[:, :, :cut], v[:, :, :cut], mask, kv, k[:, :, cut:], v[:, :, cut:])
                torch.testing.assert_close(out, expected, **close)
            assert out.transpose(1, 2).is_contiguous()  # (B, T, H, D) underneath: flattening heads is free

        def check_rope(kv, **shape):  # unrotated q and new keys, rotated by the kernel as it loads them
            q, k, v, mask = _case(torch.float32, "cpu", kv=kv, **shape)
            b, _, t, d = q.shape
            cut = k.shape[2] - t
            cos, sin = gemma.rope_tables(torch.arange(t).expand(b, t) + torch.arange(b)[:, None] + cut, d)
            k_rotated = torch.cat([k[:, :, :cut], gemma.apply_rope(k[:, :, cut:], cos, sin)], 2)
            with torch.no_grad():
                expected = gemma.attention(gemma.apply_rope(q, cos, sin), k_rotated, v, mask, kv)
                cache, new = (k[:, :, :cut], v[:, :, :cut]), (k[:, :, cut:], v[:, :, cut:])
                fallback = kernels.attention(q, *new, mask, kv, cache, rope=(cos, sin))  # float32 CPU: the reference
            torch.testing.assert_close(fallback, expected)
            out = kernels.cached_attention(q, *cache, mask, kv, *new, rope=(cos, sin))
            torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)

        check(1)
        check_rope(1)
        check_rope(2, b=3, h=4, t=5, s=300, d=32)
        check(2, b=1, h=4, t=5, s=70, d=16)
        check(2, b=3, h=4, t=5, s=300, d=16)  # 6 batch x kv-head pairs: the large tiling
        print("ok")
        """
    )
    out = run_triton_interpreter(script)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_tiling_by_batch_rows_and_shared_memory(monkeypatch):
    cpu = torch.device("cpu")  # the interpreter: no shared-memory limit
    assert kernels.tiling(1, 256, cpu, rows=8 * 51) == kernels.tiling(4, 256, cpu) == kernels.SMALL
    assert kernels.tiling(16, 256, cpu) == kernels.tiling(1, 256, cpu, rows=8 * 560) == kernels.LARGE
    cuda = torch.device("cuda", 0)
    for limit, expected in ((232448, kernels.LARGE), (166912, kernels.SMALL), (65536, None)):  # H100, A100, less
        props = type("Props", (), {"shared_memory_per_block_optin": limit})()
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, props=props: props)
        assert kernels.tiling(16, 256, cuda) == expected


def test_dispatch_only_for_bf16_cuda_inference_against_a_cache(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "tiling_for", lambda q, kv: kernels.SMALL)
    monkeypatch.setattr(kernels, "cached_attention", lambda *a, **kw: calls.append(a[0].shape) or a[0])
    q, k, v, mask = _case(torch.float32, "cpu", b=1, t=4, s=9, d=16)
    cache, new = (k[:, :, :5], v[:, :, :5]), (k[:, :, 5:], v[:, :, 5:])
    with torch.no_grad():
        kernels.attention(q, *new, mask, 1, cache)  # queries against a cache: the kernel
        kernels.attention(q[:, :, :1], *new, mask[:, :, :1], 1, cache)  # one query (PI0-FAST decoding): the reference
        kernels.attention(q, k[:, :, :4], v[:, :, :4], mask[..., :4], 1)  # no cache, few scores (a prefix): the kernel
        monkeypatch.setattr(gemma, "SMALL_ATTENTION", 0)
        kernels.attention(q, k[:, :, :4], v[:, :, :4], mask[..., :4], 1)  # no cache, more scores: SDPA
    assert calls == [q.shape, q.shape]
    expected = gemma.attention(q, k, v, mask, 1)
    torch.testing.assert_close(kernels.attention(q, *new, mask, 1, cache), expected)  # with gradients: the reference
    assert calls == [q.shape, q.shape]
    monkeypatch.undo()
    assert kernels.tiling_for(q, 1) is None  # float32 / CPU never dispatch to it


def test_layers_use_the_kernel_only_where_installed(monkeypatch):
    from conftest import random_observation

    from pi0_lightning.model.config import PI0Config
    from pi0_lightning.model.pi0 import PI0
    from pi0_lightning.model.speed import SpeedConfig, apply_speed_paths, disabled

    calls = []
    real = kernels.attention
    monkeypatch.setattr(kernels, "attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    torch.manual_seed(0)
    model = PI0(PI0Config.variant("pi0_tiny", action_horizon=6)).eval()
    obs, noise = random_observation(model.config), torch.randn(2, 6, 32)
    reference = model.sample_actions(obs, noise=noise, num_steps=2)
    assert calls == []
    apply_speed_paths(model, SpeedConfig(fused_projections=False))
    torch.testing.assert_close(model.sample_actions(obs, noise=noise, num_steps=2), reference)
    per_call = 3 * len(model.llm.layers) - 1  # two denoising steps, the prefix pass but its last layer (keys only)
    assert len(calls) == per_call
    with disabled(model, "attention_kernel"):
        model.sample_actions(obs, noise=noise, num_steps=2)
    assert len(calls) == per_call


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize(
    "shape", [dict(b=2, d=64), dict(b=1, s=611, d=256), dict(b=8, s=611, d=256), dict(b=3, h=4, kv=2, t=17, s=90, d=16)]
)
def test_kernel_matches_matmul_attention_on_cuda(shape):
    q, k, v, mask = _case(torch.bfloat16, "cuda", **shape)
    kv = shape.get("kv", 1)
    with torch.no_grad():
        expected = gemma.attention(q, k, v, mask, kv).float()
        cut = k.shape[2] - shape.get("t", 51) // 2  # the cache, then this step's keys
        args = (q, k[:, :, cut:], v[:, :, cut:], mask, kv, (k[:, :, :cut], v[:, :, :cut]))
        out = kernels.attention(*args)
        compiled = torch.compile(kernels.attention, dynamic=False)(*args)
    assert out.dtype == torch.bfloat16
    # both round probabilities once to bf16 (in different places) and the output to bf16
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(compiled, out, atol=0, rtol=0)


@pytest.mark.gpu
@needs_triton
def test_kernel_rotates_queries_and_new_keys_on_cuda():
    # the denoising steps at batch 1: 51 unrotated queries and new keys after 560 rotated cached keys
    q, k, v, mask = _case(torch.bfloat16, "cuda", b=1, t=51, s=611, d=256)
    cos, sin = gemma.rope_tables(torch.arange(560, 611, device="cuda")[None], 256)
    cache, new = (k[:, :, :560], v[:, :, :560]), (k[:, :, 560:], v[:, :, 560:])
    with torch.no_grad():
        q_rotated, k_rotated = kernels.rotate_qk(q, new[0], (cos, sin))
        expected = gemma.attention(q_rotated, k_rotated, new[1], mask, 1, cache).float()
        out = kernels.attention(q, *new, mask, 1, cache, rope=(cos, sin))
        compiled = torch.compile(kernels.attention, dynamic=False)(q, *new, mask, 1, cache, rope=(cos, sin))
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(compiled, out, atol=0, rtol=0)


@pytest.mark.gpu
@needs_triton
def test_kernel_matches_matmul_attention_without_cache_on_cuda():
    # the prefix pass at batch 1: 8 heads x 560 tokens against themselves, the large tiling
    q, k, v, mask = _case(torch.bfloat16, "cuda", b=1, t=560, s=560, d=256)
    with torch.no_grad():
        expected = gemma.attention(q, k, v, mask, 1).float()
        assert kernels.tiling_for(q, 1) == kernels.LARGE
        out = kernels.attention(q, k, v, mask, 1)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@needs_triton
def test_bf16_sampling_with_the_kernel_in_compiled_graphs():
    from conftest import random_observation

    from pi0_lightning.model.config import PI0Config
    from pi0_lightning.model.pi0 import PI0

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = PI0(PI0Config.variant("pi0_tiny", action_horizon=6)).apply_dtype_policy("bfloat16").eval()
    obs = random_observation(model.config).to("cuda")
    noise = torch.randn(2, 6, 32, device="cuda")
    assert_kernels_match_in_compiled_graphs(model, obs, noise, "attention_kernel")
