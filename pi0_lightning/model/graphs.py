"""`sample_actions` (PI0) and PI0-FAST's decoding steps captured as CUDA graphs, replayed with new inputs.

At small batch an eager PI0 call is host-bound: hundreds of small kernels per Euler step. Capturing the whole call
(prefix pass, 10 denoise steps) once and replaying it removes the launch overhead. Inputs are copied into static
buffers captured with the graph; parameters are referenced by address, so in-place optimizer updates (AdamW) are
seen by later replays, while re-allocating parameters (`.to()`, `load_state_dict(assign=True)`) needs `reset()`.
The graph runners are built by `speed.apply_speed_paths`, which installs the model's other speed paths first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pi0_lightning.model.observation import Observation
from pi0_lightning.model.pi0 import PI0


def _signature(obs: Observation, noise: torch.Tensor, num_steps: int, guidance: float | None) -> tuple:
    images = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(obs.images.items()))
    return (images, tuple(obs.tokenized_prompt.shape), tuple(noise.shape), num_steps, guidance)


def _static_copy(obs: Observation) -> Observation:
    return Observation(
        images={k: v.clone() for k, v in obs.images.items()},
        image_masks={k: v.clone() for k, v in obs.image_masks.items()},
        state=obs.state.clone(),
        tokenized_prompt=obs.tokenized_prompt.clone(),
        tokenized_prompt_mask=obs.tokenized_prompt_mask.clone(),
    )


def _copy_into(dst: Observation, src: Observation) -> None:
    for k in dst.images:
        dst.images[k].copy_(src.images[k], non_blocking=True)
        dst.image_masks[k].copy_(src.image_masks[k], non_blocking=True)
    dst.state.copy_(src.state, non_blocking=True)
    dst.tokenized_prompt.copy_(src.tokenized_prompt, non_blocking=True)
    dst.tokenized_prompt_mask.copy_(src.tokenized_prompt_mask, non_blocking=True)


class _Captured:
    def __init__(self, model: PI0, obs: Observation, noise: torch.Tensor, num_steps: int, guidance: float | None):
        self.model = model
        self.obs = _static_copy(obs)
        self.noise = noise.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():  # warm-up (allocator, cuBLAS handles) outside the capture
            for _ in range(2):
                model.sample_actions(self.obs, noise=self.noise, num_steps=num_steps, guidance=guidance)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.out = model.sample_actions(self.obs, noise=self.noise, num_steps=num_steps, guidance=guidance)

    def __call__(self, obs: Observation, noise: torch.Tensor, before_replay: Callable[[], None]) -> torch.Tensor:
        _copy_into(self.obs, obs)
        before_replay()
        self.noise.copy_(noise, non_blocking=True)
        self.graph.replay()
        return self.out.clone()


def use_tf32() -> None:
    """float32 matmuls (openpi's float32 islands, attention scores) on TF32 tensor cores, as XLA does by default on
    GPUs (so also openpi's JAX models); set by the command-line entry points, not by importing the library."""
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")


class CUDAGraphSampler:
    """Drop-in for `model.sample_actions(obs, noise, num_steps, guidance)` on CUDA; one graph per signature. Off
    CUDA it samples eagerly.

    `before_replay` runs before every replay: the replay reads inference-time copies of weights (stacked
    projections) where the eager call would bring them up to date with the parameters first."""

    def __init__(self, model: PI0, before_replay: Callable[[], None] = lambda: None):
        self.model = model
        self.before_replay = before_replay
        self._graphs: dict[tuple, _Captured] = {}

    def __call__(
        self, obs: Observation, noise: torch.Tensor, num_steps: int = 10, guidance: float | None = None
    ) -> torch.Tensor:
        if noise.device.type != "cuda":
            return self.model.sample_actions(obs, noise=noise, num_steps=num_steps, guidance=guidance)
        key = _signature(obs, noise, num_steps, guidance)
        if key not in self._graphs:
            self._graphs[key] = _Captured(self.model, obs, noise, num_steps, guidance)
        return self._graphs[key](obs, noise, self.before_replay)

    def reset(self) -> None:
        self._graphs.clear()


class FASTGraphDecoder:
    """PI0-FAST decoding steps replayed as CUDA graphs: `model.sample_tokens(obs, ..., decoder=FASTGraphDecoder(m))`.

    One graph per (batch, prefix length, decoding budget, dtype) captures `PI0FAST.decode_step` on persistent
    static buffers; each call copies the new prefix cache into them and replays one graph per token. The prefill
    stays eager (one large pass); token choice and the stop check stay on the host side of the loop. Off CUDA it
    runs the eager steps."""

    def __init__(self, model):
        self.model = model
        self._states: dict[tuple, tuple[dict, torch.cuda.CUDAGraph | None, torch.Tensor | None]] = {}
        self._current: tuple | None = None

    def prepare(self, pre: dict, max_decoding_steps: int) -> dict:
        b = pre["last"].shape[0]
        key = (b, pre["length"], max_decoding_steps, pre["dtype"], pre["last"].device)
        if pre["last"].device.type != "cuda":
            self._current = (self.model.decode_buffers(pre, max_decoding_steps), None, None)
            return self._current[0]
        if key not in self._states:
            buf = self.model.decode_buffers(pre, max_decoding_steps)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.no_grad():  # warm-up outside the capture
                for _ in range(2):
                    self.model.decode_step(buf)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.no_grad():
                logits = self.model.decode_step(buf)
            self._states[key] = (buf, graph, logits)
        self._current = self._states[key]
        return self.model.load_prefix(self._current[0], pre)

    def step(self, buf: dict) -> torch.Tensor:
        _, graph, logits = self._current
        if graph is None:
            return self.model.decode_step(buf)
        graph.replay()
        return logits
