"""RLOO (leave-one-out) advantages for groups of K rollouts of one context, with binary task-success rewards.

A_k = R_k - mean_{j != k} R_j = K / (K - 1) * (R_k - mean(R)). No division by the group std (RIPT, unlike GRPO).
Within a non-degenerate group (0 < successes < K) A > 0 exactly for the successes; a group whose K rewards are all
equal has A = 0 everywhere and carries no signal, so dynamic sampling drops it (`useful_groups`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from pi0_lightning.rollout.types import EpisodeResult


def rloo_advantages(rewards: np.ndarray) -> np.ndarray:
    """rewards (G, K) -> advantages (G, K), float32."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 2 or r.shape[1] < 2:
        raise ValueError(f"rewards must be (groups, K >= 2), got shape {r.shape}")
    k = r.shape[1]
    baseline = (r.sum(axis=1, keepdims=True) - r) / (k - 1)
    return (r - baseline).astype(np.float32)


def useful_groups(rewards: np.ndarray) -> np.ndarray:
    """(G,) bool: groups whose rewards are not all equal (the others have zero advantage everywhere)."""
    r = np.asarray(rewards)
    return (r != r[:, :1]).any(axis=1)


@dataclass
class GroupResult:
    """The K episodes of one context and what RLOO made of them."""

    group: int
    episodes: list[EpisodeResult]
    rewards: np.ndarray  # (K,)
    advantages: np.ndarray  # (K,)
    useful: bool


def group_episodes(episodes: list[EpisodeResult], group_size: int) -> tuple[list[GroupResult], int]:
    """RLOO over complete groups; groups with an invalid (crashed) episode are dropped. Returns (groups, dropped)."""
    by_group: dict[int, list[EpisodeResult]] = defaultdict(list)
    for ep in episodes:
        by_group[ep.request.group].append(ep)
    groups, dropped = [], 0
    for gid in sorted(by_group):
        eps = by_group[gid]
        if len(eps) != group_size or not all(e.valid for e in eps):
            dropped += 1
            continue
        rewards = np.array([[float(e.success) for e in eps]])
        groups.append(GroupResult(gid, eps, rewards[0], rloo_advantages(rewards)[0], bool(useful_groups(rewards)[0])))
    return groups, dropped
