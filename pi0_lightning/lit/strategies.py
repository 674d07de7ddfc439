"""Distributed strategies as YAML-friendly factories (wrap policies are classes, which YAML cannot spell).

`JointLayer` (one depth of both Gemma experts) and `SiglipBlock` are the FSDP wrap units: the model calls them
(not their submodules' methods), which FSDP's all-gather hooks require. Activation checkpointing has one mechanism
for every strategy, the model's (`model.speed.set_activation_checkpointing`, per block, around the block's whole
call); the FSDP strategy's `activation_checkpointing` applies it rather than Lightning's CheckpointWrapper.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from typing import Literal

from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from pi0_lightning.model.gemma import JointLayer
from pi0_lightning.model.siglip import SiglipBlock
from pi0_lightning.model.speed import has_activation_checkpointing, set_activation_checkpointing


def ddp_strategy(find_unused_parameters: bool = True, timeout_minutes: int = 120) -> DDPStrategy:
    """DDP (NCCL on GPU, gloo on CPU). Unused parameters exist (the PaliGemma final norm feeds nothing in the loss);
    the long timeout covers ranks waiting at a collective while others finish rollouts."""
    return DDPStrategy(find_unused_parameters=find_unused_parameters, timeout=timedelta(minutes=timeout_minutes))


def fsdp_strategy(
    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "SHARD_GRAD_OP",
    activation_checkpointing: bool = True,
    state_dict_type: Literal["full", "sharded"] = "full",
    timeout_minutes: int = 120,
) -> FSDPStrategy:
    """FSDP with JointLayer / SiglipBlock as wrap units; SHARD_GRAD_OP keeps parameters gathered between the many
    forward calls of a rollout. `activation_checkpointing`: every block, unless the LightningModule chose some."""
    return CheckpointingFSDPStrategy(
        checkpoint_blocks=activation_checkpointing,
        auto_wrap_policy={JointLayer, SiglipBlock},
        sharding_strategy=sharding_strategy,
        state_dict_type=state_dict_type,
        limit_all_gathers=True,
        use_orig_params=True,
        timeout=timedelta(minutes=timeout_minutes),
    )


class CheckpointingFSDPStrategy(FSDPStrategy):
    """FSDPStrategy with the model's activation checkpointing: with `checkpoint_blocks`, every SigLIP block and
    JointLayer is checkpointed before wrapping, unless the LightningModule already checkpointed some (its
    `checkpoint_layers` choice wins). Inside an FSDP unit the checkpoint wraps the block's call, the same nesting
    as Lightning's policy (FSDP, then CheckpointWrapper, then the block), without renaming any parameter."""

    def __init__(self, checkpoint_blocks: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.checkpoint_blocks = checkpoint_blocks

    def setup(self, trainer) -> None:
        if self.checkpoint_blocks and self.model is not None and not has_activation_checkpointing(self.model):
            set_activation_checkpointing(self.model, True)
        super().setup(trainer)


@contextlib.contextmanager
def full_parameters(trainer) -> Iterator[None]:
    """Rollouts and export call the model outside `forward()`; under FSDP, gather its full parameters for them (a
    collective: every rank enters it). A no-op for other strategies."""
    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, FSDPStrategy) or strategy.model is None:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(strategy.model, writeback=False, recurse=True):
        yield


def uses_fsdp(trainer) -> bool:
    return isinstance(getattr(trainer, "strategy", None), FSDPStrategy)
