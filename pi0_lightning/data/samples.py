"""From RLOO-scored rollout groups to training samples: one sample per executed chunk, rank padding, batching.

Each sample is one executed chunk paired with its own start observation (never the episode's first one), the
normalised actions actually executed from it (dims beyond the robot's zeroed, as in openpi's padded training data)
with a mask over executed rows, and its episode's RLOO advantage. `pad_samples` appends copies flagged
`valid=False` so that every rank runs the same number of batches (DDP requires it); the loss ignores them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pi0_lightning.rl.advantages import GroupResult


@dataclass
class TrainSample:
    inputs: Any  # PolicyInput of the chunk's start observation
    actions: np.ndarray  # (H, D) float32
    action_mask: np.ndarray  # (H,) bool
    advantage: float
    valid: bool = True
    task_id: int = -1
    record: Any = None  # the policy's per-chunk record (PI0-FAST: TokenRecord)


def chunk_samples(groups: list[GroupResult], robot_action_dim: int | None = None) -> list[TrainSample]:
    samples = []
    for g in groups:
        for ep, adv in zip(g.episodes, g.advantages, strict=True):
            for c in ep.chunks:
                actions = np.array(c.actions, dtype=np.float32)
                if robot_action_dim is not None:
                    actions[:, robot_action_dim:] = 0.0
                samples.append(
                    TrainSample(c.inputs, actions, c.action_mask, float(adv), True, ep.request.task_id, c.record)
                )
    return samples


def pad_samples(samples: list[TrainSample], target: int, filler: TrainSample | None = None) -> list[TrainSample]:
    """Append masked copies until `target` samples (of `filler`, or of the first sample)."""
    if len(samples) >= target:
        return samples
    source = filler if filler is not None else samples[0]
    pad = replace(source, valid=False, advantage=0.0)
    return samples + [pad] * (target - len(samples))


class SampleDataset(Dataset):
    def __init__(self, samples: list[TrainSample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> TrainSample:
        return self.samples[i]


def collate(samples: list[TrainSample], to_observation) -> dict[str, Any]:
    """Batch samples; `to_observation` turns a list of policy inputs into the model's Observation. Samples with
    token records (PI0-FAST) also give `tokens`, `token_mask` and `logp_old`, right-padded to the longest."""
    batch = {
        "obs": to_observation([s.inputs for s in samples]),
        "actions": torch.from_numpy(np.stack([s.actions for s in samples])),
        "action_mask": torch.from_numpy(np.stack([s.action_mask for s in samples])),
        "advantages": torch.tensor([s.advantage for s in samples], dtype=torch.float32),
        "valid": torch.tensor([s.valid for s in samples]),
        "task_ids": torch.tensor([s.task_id for s in samples]),
    }
    if samples[0].record is not None:
        n = max(len(s.record.tokens) for s in samples)
        tokens = torch.zeros(len(samples), n, dtype=torch.long)
        logp = torch.zeros(len(samples), n, dtype=torch.float32)
        mask = torch.zeros(len(samples), n, dtype=torch.bool)
        for i, s in enumerate(samples):
            k = len(s.record.tokens)
            tokens[i, :k] = torch.from_numpy(s.record.tokens)
            logp[i, :k] = torch.from_numpy(s.record.logp)
            mask[i, :k] = True
        batch.update(tokens=tokens, token_mask=mask, logp_old=logp)
    return batch
