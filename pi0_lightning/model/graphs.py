"""`sample_actions` captured as one CUDA graph per input signature, replayed with new inputs.

At small batch an eager PI0 call is host-bound: hundreds of small kernels per Euler step. Capturing the whole call
(prefix pass, 10 denoise steps) once and replaying it removes the launch overhead. Inputs are copied into static
buffers captured with the graph; parameters are referenced by address, so in-place optimizer updates (AdamW) are
seen by later replays, while re-allocating parameters (`.to()`, `load_state_dict(assign=True)`) needs `reset()`.
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

    def __call__(self, obs: Observation, noise: torch.Tensor) -> torch.Tensor:
        _copy_into(self.obs, obs)
        self.model.llm.refresh_fusions()  # the replay reads the stacked weights, not the (maybe updated) parameters
        self.noise.copy_(noise, non_blocking=True)
        self.graph.replay()
        return self.out.clone()


def use_tf32() -> None:
    """float32 matmuls (openpi's float32 islands, attention scores) on TF32 tensor cores, as XLA does by default on
    GPUs (so also openpi's JAX models); set by the command-line entry points, not by importing the library."""
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")


RECOMPILE_LIMIT = 64
"""Compiled variants allowed per block class (see `compile_blocks`)."""


def compile_blocks(model: torch.nn.Module) -> int:
    """torch.compile every transformer block (Gemma JointLayers, SigLIP blocks) in place, static shapes.

    Per block rather than the whole model: all blocks of a tower share one compiled graph per input shape (their
    parameters are graph inputs), so compilation costs one block's worth per shape instead of the unrolled
    18-layer stack; inductor fuses the norms, RoPE, residual gates, GeGLU and dtype casts around the matmuls.
    Returns the number of blocks compiled (already-compiled ones are skipped).

    All blocks of a class share one code object, and dynamo caps the compiled variants per code object (8 by
    default): prefix and suffix shapes per batch size, CFG's doubled batch, training versus inference and stacked
    versus separate projections add up past that, after which blocks silently run eager (measured: batch 1 went from
    23 to 40 ms). The cap is raised to `RECOMPILE_LIMIT`.

    A PI0 model also gets its per-denoising-step work around the layers compiled (`PI0.compile_denoise_step`)."""
    import torch._dynamo.config

    from pi0_lightning.model.gemma import JointLayer
    from pi0_lightning.model.siglip import SiglipBlock

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    count = 0
    for module in model.modules():
        if isinstance(module, (JointLayer, SiglipBlock)) and getattr(module, "_compiled_call_impl", None) is None:
            module.compile(dynamic=False, backend=_inductor_recomputing)
            count += 1
        elif isinstance(module, PI0):
            module.compile_denoise_step()
    return count


def _inductor_recomputing(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    """Inductor, with AOTAutograd's partitioner allowed to recompute in the backward the pointwise results that feed
    a matmul there (GeGLU's `gelu(gate) * up`, the norms' outputs) instead of saving them. Its default forbids that;
    for a full-size Gemma layer at batch 16 in training this cuts the saved activations from 1.56 to 1.01 GiB with
    identical results (measured on an H100, BENCHMARKS.md), so fewer layers need activation checkpointing. Scoped
    to the blocks, not set process-wide."""
    import torch._functorch.config as functorch_config
    from torch._inductor.compile_fx import compile_fx

    with functorch_config.patch(ban_recompute_materialized_backward=False):
        return compile_fx(gm, example_inputs)  # the forward/backward partition happens inside this call


class CUDAGraphSampler:
    """Drop-in for `model.sample_actions(obs, noise, num_steps, guidance)` on CUDA; one graph per signature.

    With `fuse` (default), the action expert's q/k/v and gate/up projections run as one GEMM each at inference
    (`JointGemma.fuse_projections`: ~0.3 GB of stacked weights for full-size PI0, kept in step with the parameters
    before every replay; ~0.7 GB with the norm-folded copies of `small_gemm`). With `compile`, the transformer blocks
    are compiled first (`compile_blocks`): fewer, fused kernels inside the captured graph. The first call per
    signature then includes compilation (tens of seconds)."""

    def __init__(self, model: PI0, compile: bool = False, fuse: bool = True):
        self.model = model
        self._graphs: dict[tuple, _Captured] = {}
        if fuse:
            # the 10x-repeated suffix; stacking PaliGemma's or SigLIP's projections gained nothing measurable
            model.llm.fuse_projections(experts=(1,))
        if compile:
            compile_blocks(model)

    def __call__(
        self, obs: Observation, noise: torch.Tensor, num_steps: int = 10, guidance: float | None = None
    ) -> torch.Tensor:
        if noise.device.type != "cuda":
            return self.model.sample_actions(obs, noise=noise, num_steps=num_steps, guidance=guidance)
        key = _signature(obs, noise, num_steps, guidance)
        if key not in self._graphs:
            self._graphs[key] = _Captured(self.model, obs, noise, num_steps, guidance)
        return self._graphs[key](obs, noise)

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
