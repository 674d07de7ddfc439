"""One RL iteration, RIPT-style: rollouts from the current policy, RLOO, dynamic sampling, training samples.

    for each round (at most `max_rounds`):
        contexts  <- the next `contexts_per_round` (task, init state) pairs of this rank's shard (solved ones skipped)
        episodes  <- K rollouts of every context with the current policy (one request per rollout, seeded by k)
        groups    <- RLOO per context: A_k = R_k - mean_{j != k} R_j, R = task success (rl/advantages.py)
        kept      += the useful groups (not all K rewards equal), or every group without dynamic sampling
        stop once *every* rank holds `groups_per_rank` kept groups (one all-reduce MIN per round)
    samples <- one per executed chunk of the kept groups: its start observation, executed actions, A of its episode
    pad     <- masked copies until every rank has the same number of batches (one all-reduce MAX)

The algorithm object (`rl/cfg.py`, `rl/loop.py`) then turns each batch of samples into a loss. This module knows no
Lightning: it is given a rollout function and the rank's context sampler, and returns samples and metrics.

Deliberate simplifications (as RIPT): binary success is the only reward; the episode's advantage is shared by all of
its chunks; a group with a crashed episode is dropped, not re-run; a round rolls out a fixed number of contexts per
rank even when that rank already has its quota, which keeps distributed ranks in lockstep.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pi0_lightning.data.samples import TrainSample, chunk_samples, pad_samples
from pi0_lightning.rl.advantages import group_episodes
from pi0_lightning.rl.sampling import ContextSampler, SamplingConfig, all_reduce_max, all_reduce_min
from pi0_lightning.rollout.types import EpisodeRequest, EpisodeResult, RolloutStats

Rollouts = Callable[[Sequence[EpisodeRequest], int, str], tuple[list[EpisodeResult], RolloutStats]]
"""(requests, policy-noise seed, progress label) -> (results in request order, stats)."""


@dataclass
class Iteration:
    """What one RL iteration produced on this rank."""

    samples: list[TrainSample]
    """Training samples, padded with masked copies to a multiple of the batch size equal on every rank."""
    metrics: dict[str, float] = field(default_factory=dict)
    """`rollout/*` scalars of this rank (success, groups, throughput)."""
    episodes: list[EpisodeResult] = field(default_factory=list)
    """Every episode rolled out (valid or not), in collection order."""


def run_iteration(
    rollouts: Rollouts,
    sampler: ContextSampler,
    sampling: SamplingConfig,
    prompts: dict[int, str],
    *,
    iteration: int,
    seed: int,
    rank: int,
    batch_size: int,
    robot_action_dim: int,
    device: torch.device | str = "cpu",
) -> Iteration:
    """Collect rounds until every rank holds its quota of useful groups, then build this rank's training samples."""
    s = sampling
    kept, groups_seen, episodes = [], [], []
    dropped = rounds = 0
    totals = RolloutStats()
    start = time.perf_counter()
    for rnd in range(s.max_rounds):
        rounds += 1
        contexts = sampler.next(s.contexts_per_round)
        offset = len(groups_seen) + dropped  # group ids stay unique across rounds
        requests = [
            EpisodeRequest(c.task_id, c.init_state, prompts[c.task_id], seed=seed + k, group=offset + i)
            for i, c in enumerate(contexts)
            for k in range(s.group_size)
        ]
        round_seed = hash((seed, iteration, rnd, rank)) & 0x7FFFFFFF
        results, stats = rollouts(requests, round_seed, f"iteration {iteration} round {rnd}")
        episodes += results
        totals.env_steps += stats.env_steps
        totals.env_seconds += stats.env_seconds
        totals.policy_seconds += stats.policy_seconds
        totals.policy_calls += stats.policy_calls
        totals.reset_seconds += stats.reset_seconds

        groups, n_dropped = group_episodes(results, s.group_size)
        dropped += n_dropped
        for g in groups:
            sampler.record(contexts[g.group - offset], [e.success for e in g.episodes])
        groups_seen += groups
        kept += [g for g in groups if g.useful or not s.dynamic_sampling]
        if all_reduce_min(len(kept), device) >= s.groups_per_rank:
            break
    kept = kept[: s.groups_per_rank]

    samples = chunk_samples(kept, robot_action_dim)
    filler = chunk_samples(groups_seen[:1], robot_action_dim)[:1]  # a masked copy keeps a rank without data in step
    if not samples and not filler:
        raise RuntimeError("no complete rollout group this iteration (all env workers failing?)")
    n = all_reduce_max(len(samples), device)
    samples = pad_samples(samples, max(1, math.ceil(n / batch_size)) * batch_size, filler[0] if filler else None)

    totals.wall_seconds = time.perf_counter() - start
    metrics = _metrics(episodes, groups_seen, kept, samples, totals, rounds, sampler.skipped_total)
    return Iteration(samples, metrics, episodes)


def _metrics(episodes, groups, kept, samples, totals: RolloutStats, rounds: int, skipped: int) -> dict[str, float]:
    valid = [e for e in episodes if e.valid]
    adv = np.concatenate([g.advantages for g in kept]) if kept else np.zeros(1)
    metrics = {
        "rollout/success_rate": float(np.mean([e.success for e in valid])) if valid else 0.0,
        "rollout/episodes": float(len(valid)),
        "rollout/episode_len": float(np.mean([e.length for e in valid])) if valid else 0.0,
        "rollout/groups": float(len(groups)),
        "rollout/useful_group_frac": sum(g.useful for g in groups) / max(len(groups), 1),
        "rollout/kept_groups": float(len(kept)),
        "rollout/rounds": float(rounds),
        "rollout/invalid_episodes": float(len(episodes) - len(valid)),
        "rollout/skipped_contexts": float(skipped),
        "rollout/adv_abs_mean": float(np.abs(adv).mean()),
        "rollout/adv_pos_frac": float((adv > 0).mean()),
        "rollout/train_chunks": float(sum(x.valid for x in samples)),
        "rollout/env_steps_per_s": totals.env_steps_per_s,
        "rollout/env_seconds": totals.env_seconds,
        "rollout/policy_ms_per_call": 1000 * totals.policy_seconds / max(totals.policy_calls, 1),
        "rollout/policy_seconds": totals.policy_seconds,
        "rollout/reset_worker_seconds": totals.reset_seconds,
        "rollout/seconds": totals.wall_seconds,
    }
    decoded = [c.record.decoded for e in valid for c in e.chunks if hasattr(c.record, "decoded")]
    if decoded:  # PI0-FAST: chunks whose tokens were not a well-formed action (the env got zeros)
        metrics["rollout/undecodable_frac"] = 1.0 - float(np.mean(decoded))
    return metrics
