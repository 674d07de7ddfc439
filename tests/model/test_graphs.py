"""CUDA-graph replay of sample_actions equals eager sampling (GPU only) and falls back to eager on the CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import random_observation

from pi0_lightning.model.config import PI0Config
from pi0_lightning.model.graphs import CUDAGraphSampler
from pi0_lightning.model.pi0 import PI0


def test_cpu_falls_back_to_eager():
    torch.manual_seed(0)
    model = PI0(PI0Config.variant("pi0_tiny", action_horizon=6)).eval()
    obs = random_observation(model.config)
    noise = torch.randn(2, 6, 32)
    torch.testing.assert_close(
        CUDAGraphSampler(model)(obs, noise, 3), model.sample_actions(obs, noise=noise, num_steps=3)
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("guidance", [None, 2.0])
def test_graph_replay_matches_eager_for_new_inputs(guidance):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = PI0(PI0Config.variant("pi0_tiny", action_horizon=6)).add_cfg_conditions(2).eval()
        torch.nn.init.normal_(model.cfg_embed.weight)
    sampler = CUDAGraphSampler(model)
    for seed in range(3):  # capture on the first inputs, replay on new ones
        obs = random_observation(model.config, seed=seed).to("cuda")
        noise = torch.randn(2, 6, 32, device="cuda")
        eager = model.sample_actions(obs, noise=noise, num_steps=4, guidance=guidance)
        torch.testing.assert_close(sampler(obs, noise, 4, guidance), eager, atol=1e-4, rtol=1e-4)
    assert len(sampler._graphs) == 1
