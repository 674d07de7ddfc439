"""CUDA-graph replay (from `apply_speed_paths`) equals eager sampling (GPU only) and falls back to eager on the
CPU; compiled blocks."""

from __future__ import annotations

import pytest
import torch
from conftest import random_observation

from pi0_lightning.model.config import PI0Config
from pi0_lightning.model.graphs import CUDAGraphSampler, FASTGraphDecoder
from pi0_lightning.model.pi0 import PI0
from pi0_lightning.model.speed import SpeedConfig, apply_speed_paths

GRAPHS = SpeedConfig(cuda_graphs=True)


def test_cpu_falls_back_to_eager():
    torch.manual_seed(0)
    model = PI0(PI0Config.variant("pi0_tiny", action_horizon=6)).eval()
    obs = random_observation(model.config)
    noise = torch.randn(2, 6, 32)
    expected = model.sample_actions(obs, noise=noise, num_steps=3)
    sampler = apply_speed_paths(model, SpeedConfig(cuda_graphs=True, fused_projections=False))
    assert isinstance(sampler, CUDAGraphSampler)
    torch.testing.assert_close(sampler(obs, noise, 3), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("guidance", [None, 2.0])
def test_graph_replay_matches_eager_for_new_inputs(guidance):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = PI0(PI0Config.variant("pi0_tiny", action_horizon=6)).add_cfg_conditions(2).eval()
        torch.nn.init.normal_(model.cfg_embed.weight)
    sampler = apply_speed_paths(model, GRAPHS)
    for seed in range(3):  # capture on the first inputs, replay on new ones
        obs = random_observation(model.config, seed=seed).to("cuda")
        noise = torch.randn(2, 6, 32, device="cuda")
        eager = model.sample_actions(obs, noise=noise, num_steps=4, guidance=guidance)
        torch.testing.assert_close(sampler(obs, noise, 4, guidance), eager, atol=1e-4, rtol=1e-4)
    assert len(sampler._graphs) == 1


def _fast_case(device: str):
    from pi0_lightning.model.observation import Observation
    from pi0_lightning.model.pi0_fast import PI0FAST, PI0FASTConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = PI0FAST(PI0FASTConfig.variant("pi0_fast_micro")).eval()
    keys = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
    obs = Observation(
        {k: torch.rand(2, 3, 112, 112) * 2 - 1 for k in keys},
        {k: torch.ones(2, dtype=torch.bool) for k in keys},
        torch.zeros(2, 8),
        torch.randint(3, 1000, (2, 20)),
        torch.arange(20)[None].expand(2, -1) < torch.tensor([[12], [20]]),
        token_ar_mask=torch.zeros(2, 20, dtype=torch.long),
    ).to(device)
    return model, obs


def test_fast_decoder_off_cuda_runs_the_eager_steps():
    model, obs = _fast_case("cpu")
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    eager = model.sample_tokens(obs, 8, temperature=1.0, generator=g1, return_logp=True)
    decoder = apply_speed_paths(model, GRAPHS)
    assert isinstance(decoder, FASTGraphDecoder)
    via = model.sample_tokens(obs, 8, temperature=1.0, generator=g2, return_logp=True, decoder=decoder)
    assert torch.equal(eager[0], via[0]) and torch.equal(eager[1], via[1])


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_fast_graph_decoding_matches_eager_for_new_inputs(compiled):
    model, obs = _fast_case("cuda")
    prompts = [torch.randint(3, 1000, (2, 20), generator=torch.Generator().manual_seed(s)).cuda() for s in range(3)]
    references = []
    for prompt in prompts:  # eager, uncompiled references
        obs.tokenized_prompt = prompt
        references.append(model.sample_tokens(obs, 10, return_logits=True))
    decoder = apply_speed_paths(model, SpeedConfig(cuda_graphs=True, compile=compiled))
    for prompt, (tokens, logits) in zip(prompts, references, strict=True):  # capture on the first, replay on new ones
        obs.tokenized_prompt = prompt
        g_tokens, g_logits = model.sample_tokens(obs, 10, return_logits=True, decoder=decoder)
        assert torch.equal(tokens, g_tokens)
        torch.testing.assert_close(torch.stack(g_logits), torch.stack(logits), atol=1e-4, rtol=1e-4)
    assert len(decoder._states) == 1


def _tiny_cuda_case():
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = PI0(PI0Config.variant("pi0_tiny", action_horizon=6)).eval()
    return model, random_observation(model.config).to("cuda"), torch.randn(2, 6, 32, device="cuda")


@pytest.mark.gpu
def test_compiled_blocks_in_the_graph_match_eager():
    model, obs, noise = _tiny_cuda_case()
    eager = model.sample_actions(obs, noise=noise, num_steps=3)
    sampler = apply_speed_paths(model, SpeedConfig(cuda_graphs=True, compile=True))
    torch.testing.assert_close(sampler(obs, noise, 3), eager, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_replay_with_fused_projections_follows_weight_updates():
    model, obs, noise = _tiny_cuda_case()
    sampler = apply_speed_paths(model, GRAPHS)
    assert model.llm.layers[0].stacks[1] is not None
    sampler(obs, noise, 3)  # captured
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    model(obs, torch.randn(2, 6, 32, device="cuda")).mean().backward()
    opt.step()
    model.eval()
    replay = sampler(obs, noise, 3)
    apply_speed_paths(model, SpeedConfig(fused_projections=False))  # the same updated model without the stacks
    torch.testing.assert_close(replay, model.sample_actions(obs, noise=noise, num_steps=3), atol=1e-4, rtol=1e-4)


def _saved_bytes_and_grads(module: torch.nn.Module, x: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    """Bytes of the distinct tensors a forward saves for its backward (parameters and input excluded), and grads."""
    saved: dict[int, int] = {}
    skip = {p.data_ptr() for p in module.parameters()} | {x.data_ptr()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    return sum(saved.values()), grads


def test_compiled_blocks_recompute_the_geglu_product_instead_of_saving_it():
    """compile_blocks' backend lets the partitioner recompute `gelu(gate) * up` (down_proj's input) in the backward:
    fewer saved bytes than default inductor, same gradients."""
    from pi0_lightning.model.gemma import GeGLU
    from pi0_lightning.model.speed import _inductor_recomputing

    torch.manual_seed(0)
    mlp, x = GeGLU(16, 64), torch.randn(4, 8, 16, requires_grad=True)
    default_bytes, default_grads = _saved_bytes_and_grads(torch.compile(mlp, dynamic=False), x)
    torch._dynamo.reset()
    recomputing = torch.compile(mlp, dynamic=False, backend=_inductor_recomputing)
    recompute_bytes, recompute_grads = _saved_bytes_and_grads(recomputing, x)
    torch._dynamo.reset()
    product_bytes = 4 * 8 * 64 * 4  # one float32 (4, 8, 64) tensor
    assert recompute_bytes <= default_bytes - product_bytes, (recompute_bytes, default_bytes)
    for a, b in zip(recompute_grads, default_grads, strict=True):
        torch.testing.assert_close(a, b)
