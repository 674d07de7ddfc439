"""Records of a rollout: what was asked for, what each executed chunk saw and did, and how each episode ended."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass
class EpisodeRequest:
    """One episode to run: a context (task, initial state) plus bookkeeping for RL groups and videos.

    Not frozen: validation batches of requests pass through strategy input hooks (FSDP, Lightning's device transfer)
    that rebuild dataclasses field by field."""

    task_id: int
    init_state: int
    prompt: str
    seed: int | None = None
    """Env seed, set before this episode's reset (the layout is a function of it); ignored with `rng_state`."""
    rng_state: Any = None
    """The simulator's random-stream state to restore before the reset (LIBERO: openpi's per-task stream, see
    `envs.libero.LiberoEnv.reset_streams`), so episode k gets the layout of a sequential run's episode k."""
    hard_reset: bool | None = None
    """LIBERO: rebuild the simulator at this episode's reset (True) or reset it softly (False); None = the env's
    setting."""
    group: int = -1
    """RL group id (the K rollouts of one context share it); -1 outside RL."""
    record_video: bool = False
    pad: bool = False
    """A filler episode that keeps distributed ranks in lockstep; excluded from metrics."""


@dataclass
class Chunk:
    """One executed action chunk, paired with its own start observation (as policy input)."""

    inputs: Any
    """Compact policy inputs for this one observation (see `ChunkPolicy.prepare`)."""
    actions: np.ndarray
    """(H, action_dim) normalised model-space actions; rows past `num_executed` are zero padding."""
    num_executed: int
    """How many of the chunk's actions were executed before replanning or the episode's end."""
    step: int
    """Policy step (after the wait steps) at which the chunk started."""
    record: Any = None
    """What the policy returned about this row besides actions (PI0-FAST: sampled tokens and their log-probs)."""

    @property
    def action_mask(self) -> np.ndarray:
        return np.arange(len(self.actions)) < self.num_executed


@dataclass
class EpisodeResult:
    request: EpisodeRequest
    success: bool = False
    length: int = 0
    valid: bool = True
    """False when the worker crashed or hung and retries were exhausted (never trained on)."""
    failure: str | None = None
    chunks: list[Chunk] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)


@dataclass
class RolloutStats:
    episodes: int = 0
    successes: int = 0
    env_steps: int = 0
    env_seconds: float = 0.0
    """Main-process time spent waiting for env workers (with pipelined collection, only when no group could be
    given to the policy)."""
    policy_seconds: float = 0.0
    """Main-process time in `prepare` + `act`."""
    policy_calls: int = 0
    reset_seconds: float = 0.0
    """Env-side time of the resets (build, reset, init state, wait steps) summed over workers, where the env
    reports it (`info["reset_seconds"]`); divided by workers x wall, the share of worker time spent resetting."""
    wall_seconds: float = 0.0
    failed_attempts: int = 0

    @property
    def env_steps_per_s(self) -> float:
        return self.env_steps / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def success_rate(self) -> float:
        return self.successes / self.episodes if self.episodes else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "episodes": self.episodes,
            "success_rate": self.success_rate,
            "env_steps": self.env_steps,
            "env_steps_per_s": self.env_steps_per_s,
            "env_seconds": self.env_seconds,
            "policy_seconds": self.policy_seconds,
            "policy_ms_per_call": 1000 * self.policy_seconds / max(self.policy_calls, 1),
            "reset_seconds": self.reset_seconds,
            "wall_seconds": self.wall_seconds,
            "failed_attempts": self.failed_attempts,
        }


class ChunkPolicy(Protocol):
    """What the collector needs from a policy: batched, in the main process only."""

    action_horizon: int

    def prepare(self, observations: list[dict[str, np.ndarray]], prompts: list[str]) -> list[Any]:
        """Compact per-observation policy inputs (stored with each chunk for training)."""

    def act(self, inputs: list[Any], seeds: Sequence[int]) -> tuple[np.ndarray, ...]:
        """One batched call: (model-space actions (B, H, D), env actions (B, H, 7)), optionally followed by one
        record per row that is stored with the chunk (`Chunk.record`). `seeds[k]` fixes row k's noise, and only
        row k's: a row's output depends on its own input and seed, not on the other rows of the batch (up to
        floating-point differences of batched kernels), so rollouts do not depend on how they were batched."""
