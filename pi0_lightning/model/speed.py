"""Speed paths, switched on in one place: `apply_speed_paths(model, SpeedConfig(...))`.

The model modules (`gemma.py`, `siglip.py`, `pi0.py`, `pi0_fast.py`) are openpi's maths in plain torch. Everything
that makes them faster or leaner is applied to a built model from outside, as torchtitan's `parallelize` applies
activation checkpointing, compilation and FSDP to a plain model. This module is the only place where the Triton
kernels, the stacked weights, compilation, CUDA graphs and activation checkpointing are switched on or off:

- `fused_projections`: the action expert's q/k/v and gate/up projections run as one stacked GEMM each at inference
  (`fused.FusedWeight`: ~0.3 GB for full-size PI0; with `small_gemm` also a norm-folded copy, ~0.4 GB). The copies
  follow the parameters: before every inference call of a layer (and before every CUDA-graph replay) they are
  refreshed in place if an optimizer step or `load_state_dict` changed a source.
- `attention_kernel`: the flash-decoding Triton kernel of `attention_kernel.py` for attention at inference in bf16 on
  CUDA (the denoising steps, which read the prefix cache in place and rotate queries and new keys as they load them, and
  the prefix pass at small batch).
- `small_gemm`: at most 64 rows (batch-1 denoising steps), the action expert's GEMMs run as `small_gemm.py`'s Triton
  GEMMs with the RMSNorm, GeGLU and residual adds fused in (needs `fused_projections`).
- `compile`: every JointLayer and SigLIP block torch.compiled (static shapes) and PI0's per-step work around the
  layers (`suffix_tokens`, `euler_update`).
- `cuda_graphs`: `apply_speed_paths` returns a runner that replays PI0's whole `sample_actions` (`CUDAGraphSampler`)
  or each PI0-FAST decoding step (`FASTGraphDecoder`) as CUDA graphs.
- `activation_checkpointing`: SigLIP blocks and the first `checkpoint_layers` JointLayers (all by default) recompute
  their activations in the backward. It is the only activation-checkpointing mechanism: the FSDP strategy
  (`lit/strategies.py`) applies it too.

How paths are installed: each JointLayer and SiglipBlock has its class swapped in place for a subclass here (as
FSDP2's `fully_shard` does) that overrides the reference's hook points (`JointLayer.project_qkv`, `mlp`, `attention`;
the one-expert-against-a-cache inference step of `forward`; the module call for checkpointing). The module tree,
parameter names, state dict, FSDP wrap units and optimizer references stay as they are.

Numerics: with gradients (training) every layer runs the reference forward; the kernels and fused GEMMs agree with
it to bf16 rounding (they round in other places, see their modules), the stacked GEMMs to float rounding.
Deliberate simplifications: stacked weights only for the action expert (stacking PaliGemma or SigLIP gained nothing
measurable on an H100); no stacked weights under FSDP (they would copy shards); the kernels' tilings were tuned on an
H100 only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from pi0_lightning.model import attention_kernel, gemma, small_gemm
from pi0_lightning.model.fused import ExpertStack
from pi0_lightning.model.gemma import JointGemma, JointLayer, apply_rope, residual
from pi0_lightning.model.graphs import CUDAGraphSampler, FASTGraphDecoder
from pi0_lightning.model.pi0 import PI0
from pi0_lightning.model.pi0_fast import PI0FAST
from pi0_lightning.model.siglip import SiglipBlock

INFERENCE_PATHS = ("attention_kernel", "small_gemm", "fused_projections")


@dataclass(frozen=True)
class SpeedConfig:
    """Which speed paths `apply_speed_paths` installs. The defaults are the inference paths that run without
    compilation; compilation, CUDA graphs and activation checkpointing are asked for explicitly."""

    attention_kernel: bool = True
    """The Triton attention kernel at inference (bf16 on CUDA; elsewhere the reference attention runs)."""
    small_gemm: bool = True
    """The fused few-row Triton GEMMs in the batch-1 denoising steps (bf16 on CUDA, with `fused_projections`)."""
    fused_projections: bool = True
    """Stacked q/k/v and gate/up weights of the action expert at inference (extra GPU memory, see the module
    docstring). Not under FSDP."""
    compile: bool = False
    """torch.compile every transformer block and PI0's per-denoising-step work (tens of seconds per new shape)."""
    cuda_graphs: bool = False
    """Return a CUDA-graph runner for sampling (PI0) or decoding (PI0-FAST). Not under FSDP, whose freed parameters
    a captured graph would read."""
    activation_checkpointing: bool = False
    """Recompute SigLIP blocks and JointLayers in the backward (less memory, ~30% more time)."""
    checkpoint_layers: int | None = None
    """With `activation_checkpointing`, only the first N JointLayers (SigLIP blocks always); None = all."""


def _checkpointed_call(module: nn.Module, call: Callable, *args, **kwargs):
    if module.checkpointed and module.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(call, *args, use_reentrant=False, **kwargs)
    return call(*args, **kwargs)


class SpeedSiglipBlock(SiglipBlock):
    """A SigLIP block with activation checkpointing around its whole call, compiled code included."""

    checkpointed = False

    def __call__(self, *args, **kwargs):
        return _checkpointed_call(self, super().__call__, *args, **kwargs)


class SpeedJointLayer(JointLayer):
    """A JointLayer with the installed speed paths (switched by the attributes below, set by `apply_speed_paths`).
    With gradients it is the reference layer, checkpointed if `checkpointed`."""

    attention_kernel = False
    small_gemm = False
    fused_projections = False
    checkpointed = False
    stacks: Sequence[ExpertStack | None] = ()

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            # outside the compiled forward: the stamp checks read tensor versions and addresses
            self.refresh_stacks()
        return _checkpointed_call(self, super().__call__, *args, **kwargs)

    def stack_projections(self, experts: Sequence[int], fold_norms: bool) -> int:
        """Stack the given experts' projections (keeping existing stacks of the same kind); returns how many
        experts have stacks (LoRA-adapted ones get none)."""
        stacks = [None] * len(self.experts)
        for i in experts:
            old = self.stacks[i] if i < len(self.stacks) else None
            keep = old is not None and old.fold_norms == fold_norms
            stacks[i] = old if keep else ExpertStack.build(self.experts[i], fold_norms)
        self.stacks = stacks
        return sum(s is not None for s in stacks)

    def refresh_stacks(self) -> None:
        """Bring the stacked weights up to date with their parameters (a no-op when none changed)."""
        if any(s is not None for s in self.stacks):
            self.stacks = [s.current() if s is not None else None for s in self.stacks]

    def _stack(self, i: int) -> ExpertStack | None:
        if not self.fused_projections or torch.is_grad_enabled() or i >= len(self.stacks):
            return None
        return self.stacks[i]

    def project_qkv(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        stack = self._stack(i)
        return super().project_qkv(i, x) if stack is None else stack.qkv(x)

    def mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        stack = self._stack(i)
        if stack is None:
            return super().mlp(i, x)
        gate, up = stack.gate_up(x)
        return self.experts[i].mlp.down_proj(F.gelu(gate, approximate="tanh") * up)

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor,
        num_kv_heads: int,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`gemma.attention`, or the kernel's `attention_kernel.attention`; `rope` as in the latter."""
        if self.attention_kernel:
            return attention_kernel.attention(q, k, v, mask, num_kv_heads, cache, rope)
        if rope is not None:
            q, k = attention_kernel.rotate_qk(q, k, rope)
        return gemma.attention(q, k, v, mask, num_kv_heads, cache)

    def forward(self, hs, rope, mask, conds, kv_cache=None, return_kv=True, kv_only=False):
        """`JointLayer.forward`; one expert against a cache at inference runs `_cached_step`."""
        active = [i for i, h in enumerate(hs) if h is not None]
        if kv_cache is None or kv_only or len(active) != 1 or torch.is_grad_enabled():
            return super().forward(hs, rope, mask, conds, kv_cache, return_kv, kv_only)
        i = active[0]
        new_hs = list(hs)
        new_hs[i], kv = self._cached_step(i, hs[i], rope, mask, conds[i], kv_cache, return_kv)
        return new_hs, kv

    def _cached_step(self, i, h, rope, mask, cond, cache, return_kv):
        """One expert's tokens against a cache at inference (the denoising steps, PI0-FAST decoding): the reference
        layer without concatenation copies, with the kernel and, for few rows, the fused GEMMs."""
        expert, stack = self.experts[i], self._stack(i)
        few = self.small_gemm and stack is not None and stack.gemms_fusable() and small_gemm.usable(h)
        b, t, _ = h.shape
        if few and stack.folded_qkv is not None:
            q, k, v = small_gemm.linear(h, stack.folded_qkv.weight, rms_eps=expert.attn_norm.eps).split(
                stack.folded_qkv.sizes, -1
            )
            gate = None
        else:
            x, gate = expert.attn_norm(h, cond)
            q, k, v = self.project_qkv(i, x)
        q = q.view(b, t, self.num_heads, self.head_dim)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if return_kv:
            # this call's keys are kept (decoding): q and k rotated in one pass (one fused kernel when compiled,
            # instead of three with v's copy), v stays a view of its projection
            qk = apply_rope(torch.cat([q, k], dim=2).transpose(1, 2), *rope)
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            out = self.attention(q, k, v, mask, self.num_kv_heads, cache)
            kv = (k, v)
        else:
            # the denoising steps: q, k and v stay views of their projections and the kernel rotates q and k as it
            # loads them (no separate RoPE kernel)
            out = self.attention(q.transpose(1, 2), k.transpose(1, 2), v, mask, self.num_kv_heads, cache, rope=rope)
            kv = None
        out = out.transpose(1, 2).flatten(2)
        if not few:
            h = residual(h, expert.o_proj(out), gate)
            x, gate = expert.ffn_norm(h, cond)
            return residual(h, self.mlp(i, x), gate), kv
        # few rows: the norms, residual adds, split-K reductions and GeGLU ride in the GEMMs (4 kernels, not 9-11)
        h = small_gemm.linear(out, expert.o_proj.weight, residual=h, residual_gate=gate)
        if stack.folded_gate_up is not None:
            act = small_gemm.linear(h, stack.folded_gate_up.weight, rms_eps=expert.ffn_norm.eps, geglu=True)
            gate = None
        else:
            x, gate = expert.ffn_norm(h, cond)
            act = small_gemm.linear(x, stack.gate_up.weight, geglu=True)
        return small_gemm.linear(act, expert.mlp.down_proj.weight, residual=h, residual_gate=gate), kv


def _install(module: nn.Module, cls: type) -> None:
    if type(module) is not cls:
        module.__class__ = cls


def _gemmas(model: nn.Module) -> Iterator[tuple[JointGemma, list[SpeedJointLayer]]]:
    """Every JointGemma below `model` with its layers in depth order (looked up inside FSDP wrappers), installed."""
    for module in model.modules():
        if isinstance(module, JointGemma):
            layers = [m for m in module.layers.modules() if isinstance(m, JointLayer)]
            for layer in layers:
                _install(layer, SpeedJointLayer)
            yield module, layers


def _siglip_blocks(model: nn.Module) -> list[SpeedSiglipBlock]:
    blocks = [m for m in model.modules() if isinstance(m, SiglipBlock)]
    for block in blocks:
        _install(block, SpeedSiglipBlock)
    return blocks


def set_activation_checkpointing(model: nn.Module, enabled: bool, checkpoint_layers: int | None = None) -> None:
    """Activation checkpointing of SigLIP blocks and the first `checkpoint_layers` JointLayers (None: all) of any
    module tree (a PI0 model, a LightningModule holding one, FSDP-wrapped or not); `enabled=False` switches it off.
    Checkpointing wraps a block's whole call, compiled code included; inside an FSDP unit it runs after the unit's
    all-gather, where Lightning's CheckpointWrapper would sit."""
    for _, layers in _gemmas(model):
        for depth, layer in enumerate(layers):
            layer.checkpointed = enabled and (checkpoint_layers is None or depth < checkpoint_layers)
    for block in _siglip_blocks(model):
        block.checkpointed = enabled


def has_activation_checkpointing(model: nn.Module) -> bool:
    """Whether any block of `model` is checkpointed (by `set_activation_checkpointing`)."""
    return any(getattr(m, "checkpointed", False) for m in model.modules() if isinstance(m, (JointLayer, SiglipBlock)))


def refresh_stacks(model: nn.Module) -> None:
    """Bring every stacked weight of `model` up to date with its parameters (before a CUDA-graph replay, which runs
    no Python)."""
    for module in model.modules():
        if isinstance(module, SpeedJointLayer):
            module.refresh_stacks()


RECOMPILE_LIMIT = 64
"""Compiled variants allowed per block class (see `compile_blocks`)."""


def compile_blocks(model: nn.Module, enabled: bool = True) -> int:
    """torch.compile every transformer block (Gemma JointLayers, SigLIP blocks) in place, static shapes, and a PI0
    model's per-step work around the layers (`compile_denoise_step`); `enabled=False` returns them to eager.

    Per block rather than the whole model: all blocks of a tower share one compiled graph per input shape (their
    parameters are graph inputs), so compilation costs one block's worth per shape instead of the unrolled
    18-layer stack; inductor fuses the norms, RoPE, residual gates, GeGLU and dtype casts around the matmuls.
    Returns the number of blocks newly compiled.

    All blocks of a class share one code object, and dynamo caps the compiled variants per code object (8 by
    default): prefix and suffix shapes per batch size, CFG's doubled batch, training versus inference and stacked
    versus separate projections add up past that, after which blocks silently run eager (measured: batch 1 went from
    23 to 40 ms). The cap is raised to `RECOMPILE_LIMIT`."""
    import torch._dynamo.config

    if enabled:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    count = 0
    for module in model.modules():
        if isinstance(module, (JointLayer, SiglipBlock)):
            compiled = getattr(module, "_compiled_call_impl", None) is not None
            if enabled and not compiled:
                module.compile(dynamic=False, backend=_inductor_recomputing)
                count += 1
            elif not enabled and compiled:
                module._compiled_call_impl = None  # what `nn.Module.compile` set: eager again
        elif isinstance(module, PI0):
            compile_denoise_step(module, enabled)
    return count


def compile_denoise_step(model: PI0, enabled: bool = True) -> None:
    """torch.compile the per-step work around the action expert's layers in `sample_actions`: the suffix tokens
    and the output projection with the Euler update. Eager, they are ~60 small kernels per denoising step (float32
    islands, casts, concatenations); compiled, a few fused ones besides the float32 GEMMs. The compiled functions
    shadow the methods on this instance; `enabled=False` removes them."""
    if enabled and "suffix_tokens" not in model.__dict__:
        model.suffix_tokens = torch.compile(model.suffix_tokens, dynamic=False)
        model.euler_update = torch.compile(model.euler_update, dynamic=False)
    elif not enabled:
        model.__dict__.pop("suffix_tokens", None)
        model.__dict__.pop("euler_update", None)


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


def apply_speed_paths(
    model: nn.Module, config: SpeedConfig | None = None
) -> CUDAGraphSampler | FASTGraphDecoder | None:
    """Install exactly the speed paths of `config` on `model` (a PI0 or PI0-FAST model, or any module holding one:
    paths switched off are removed, so calling it again with another config switches between them; with the same
    config it changes nothing). The single place where kernels, stacked weights, compilation, CUDA graphs and
    activation checkpointing are switched on.

    Returns, with `cuda_graphs`, the CUDA-graph runner: for PI0 a `CUDAGraphSampler`, called like
    `model.sample_actions(obs, noise, num_steps, guidance)`; for PI0-FAST a `FASTGraphDecoder`, passed as
    `model.sample_tokens(..., decoder=...)`. Both fall back to eager off CUDA. Otherwise None. `config` defaults to
    `SpeedConfig()`."""
    config = config or SpeedConfig()
    for _, layers in _gemmas(model):
        for layer in layers:
            layer.attention_kernel = config.attention_kernel
            layer.small_gemm = config.small_gemm
            layer.fused_projections = config.fused_projections
            # the 10x-repeated action expert only
            action_expert = (1,) if config.fused_projections and len(layer.experts) > 1 else ()
            layer.stack_projections(action_expert, fold_norms=config.small_gemm)
    set_activation_checkpointing(model, config.activation_checkpointing, config.checkpoint_layers)
    compile_blocks(model, config.compile)
    if not config.cuda_graphs:
        return None
    if isinstance(model, PI0FAST):
        return FASTGraphDecoder(model)
    if isinstance(model, PI0):
        return CUDAGraphSampler(model, before_replay=partial(refresh_stacks, model))
    raise TypeError(f"cuda_graphs needs a PI0 or PI0-FAST model, got {type(model).__name__}")


@contextmanager
def disabled(model: nn.Module, *paths: str) -> Iterator[None]:
    """The reference path inside for the named inference paths of `model` (default: all of `INFERENCE_PATHS`), for
    A/B measurements and references in tests; restored after. Stacks and compiled blocks stay installed."""
    paths = paths or INFERENCE_PATHS
    unknown = set(paths) - set(INFERENCE_PATHS)
    if unknown:
        raise ValueError(f"unknown speed paths {sorted(unknown)}; choose from {INFERENCE_PATHS}")
    layers = [m for m in model.modules() if isinstance(m, SpeedJointLayer)]
    saved = [{p: getattr(layer, p) for p in paths} for layer in layers]
    for layer in layers:
        for p in paths:
            setattr(layer, p, False)
    try:
        yield
    finally:
        for layer, values in zip(layers, saved, strict=True):
            for p, value in values.items():
                setattr(layer, p, value)
