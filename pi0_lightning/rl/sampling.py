"""Contexts for RL and dynamic sampling (RIPT-style), framework-free apart from optional torch.distributed.

A context is a (task, initial state) pair; each gets a group of K rollouts. Per RL iteration every rank draws
contexts from its own shard (rank-strided over a seeded permutation, so ranks never share a context), skips contexts
whose recent rollouts all succeeded (at most `max_skips` times in a row, so solved contexts are re-tested), and keeps
collecting rounds until *every* rank holds `groups_per_rank` useful (non-degenerate) groups or `max_rounds` is spent.
Ranks agree through one `all_reduce(MIN)` per round, so every rank runs the same number of rounds (and the same
policy calls); no lock files. Deliberate simplification: a round rolls out a fixed number of contexts per rank even
if that rank already has its quota, which keeps FSDP/DDP ranks in lockstep at the cost of a few extra rollouts.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    task_id: int
    init_state: int


@dataclass
class SamplingConfig:
    group_size: int = 8
    """K rollouts per context (RLOO group)."""
    groups_per_rank: int = 4
    """Useful groups each rank must hold before training (the per-iteration quota)."""
    contexts_per_round: int = 4
    """Contexts each rank rolls out per round (K * this episodes per round)."""
    max_rounds: int = 4
    """Global budget: rounds per iteration after which training starts with whatever is useful."""
    skip_solved: bool = True
    """Skip contexts whose last `group_size` rollouts all succeeded."""
    max_skips: int = 3
    """After this many skips the context's history is forgotten, so it is re-tested."""
    dynamic_sampling: bool = True
    """Drop groups whose K rewards are all equal (zero advantage)."""


@dataclass
class ContextSampler:
    """Endless, seeded, rank-sharded stream of contexts with solved-context skipping; checkpointable."""

    contexts: list[Context]
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    skip_solved: bool = True
    history_len: int = 8
    max_skips: int = 3
    epoch: int = 0
    position: int = 0
    history: dict[Context, deque] = field(default_factory=dict)
    skips: dict[Context, int] = field(default_factory=dict)
    skipped_total: int = 0

    def __post_init__(self) -> None:
        if len(self.contexts) < self.world_size:
            raise ValueError(f"{len(self.contexts)} contexts cannot be sharded over {self.world_size} ranks")

    def _shard(self) -> list[Context]:
        order = np.random.default_rng((self.seed, self.epoch)).permutation(len(self.contexts))
        return [self.contexts[i] for i in order[self.rank :: self.world_size]]

    def _solved(self, ctx: Context) -> bool:
        h = self.history.get(ctx)
        return h is not None and len(h) >= self.history_len and all(h)

    def next(self, n: int) -> list[Context]:
        """The next n contexts of this rank's shard, skipping solved ones (bounded)."""
        out: list[Context] = []
        shard = self._shard()
        guard = 0
        while len(out) < n:
            if self.position >= len(shard):
                self.epoch, self.position = self.epoch + 1, 0
                shard = self._shard()
            ctx = shard[self.position]
            self.position += 1
            guard += 1
            if self.skip_solved and self._solved(ctx) and guard <= 4 * len(shard):
                self.skips[ctx] = self.skips.get(ctx, 0) + 1
                self.skipped_total += 1
                if self.skips[ctx] > self.max_skips:  # re-test it next time
                    self.history.pop(ctx, None)
                    self.skips.pop(ctx, None)
                continue
            out.append(ctx)
        return out

    def record(self, ctx: Context, successes: list[bool]) -> None:
        h = self.history.setdefault(ctx, deque(maxlen=self.history_len))
        h.extend(bool(s) for s in successes)
        self.skips.pop(ctx, None)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "history": [(c.task_id, c.init_state, list(h)) for c, h in self.history.items()],
            "skips": [(c.task_id, c.init_state, n) for c, n in self.skips.items()],
            "skipped_total": self.skipped_total,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self.history = {Context(t, i): deque(h, maxlen=self.history_len) for t, i, h in state["history"]}
        self.skips = {Context(t, i): n for t, i, n in state["skips"]}
        self.skipped_total = state.get("skipped_total", 0)


def all_reduce_min(value: int, device: torch.device | str = "cpu") -> int:
    """MIN over ranks (identity without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def all_reduce_max(value: int, device: torch.device | str = "cpu") -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
