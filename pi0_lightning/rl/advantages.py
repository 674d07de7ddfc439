"""RLOO (leave-one-out) advantages for groups of K rollouts of one context, with binary task-success rewards.

A_k = R_k - mean_{j != k} R_j = K / (K - 1) * (R_k - mean(R)). No division by the group std (RIPT, unlike GRPO).
Within a non-degenerate group (0 < successes < K) A > 0 exactly for the successes; a group whose K rewards are all
equal has A = 0 everywhere and carries no signal, so dynamic sampling drops it (`useful_groups`).
"""

from __future__ import annotations

import numpy as np


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
