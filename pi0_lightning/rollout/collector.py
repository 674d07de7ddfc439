"""Batched, lockstep rollouts over a pool of subprocess environments.

Episodes run in *waves*: each wave gives one episode request to each of up to N workers. Within a wave the
collector calls the policy once per chunk for all envs of the wave (one batched `act`), executes the first
`replan_steps` actions of each chunk (openpi's LIBERO protocol: replan every 5 steps, never 50 actions open-loop),
and records for each executed chunk its own start observation and the executed normalised actions padded to the
model horizon. Cameras are rendered only for observations the policy will consume (chunk starts) or for videos.

`sync_horizon=True` keeps every wave at a fixed number of policy calls (ceil(max_steps / replan_steps)), feeding
finished envs their last observation and discarding their actions, so that distributed ranks make the same forward
calls; otherwise a wave stops as soon as all of its episodes have ended.

A worker that crashes or hangs is replaced by the pool; its episode is discarded and re-queued (up to
`max_retries` times, then reported as invalid). An episode whose env raised is re-queued likewise for training
rollouts; evaluation (`retry_env_errors=False`) ends it at once, as openpi does, and counts it as a failure. The
policy noise of each call is seeded from (seed, wave, call), and env seeds (or random-stream states) come with the
requests, so the same requests and seeds give the same rollouts.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from pi0_lightning import signals
from pi0_lightning.envs.pool import EnvPool, WorkerFailure
from pi0_lightning.rollout.types import Chunk, ChunkPolicy, EpisodeRequest, EpisodeResult, RolloutStats


@dataclass
class CollectorConfig:
    replan_steps: int = 5
    """Actions executed from each predicted chunk before replanning (openpi LIBERO: 5)."""
    max_steps: int = 220
    """Policy steps per episode (after the env's wait steps)."""
    sync_horizon: bool = False
    """Fixed number of policy calls per wave (needed for lockstep across distributed ranks)."""
    max_retries: int = 2
    """Re-runs of an episode whose worker crashed or hung before it is reported invalid."""
    retry_env_errors: bool = True
    """Also re-run an episode whose env raised; False (evaluation, as openpi) ends it there as invalid."""
    seed: int = 0
    """Base seed of the policy noise."""
    progress: bool = True
    """Show a progress bar (episodes, env steps/s, success)."""


@dataclass
class _Slot:
    """The episode running on one worker during a wave."""

    index: int
    request: EpisodeRequest
    obs: dict
    result: EpisodeResult
    done: bool = False
    failed: str | None = None


def _reset_options(request: EpisodeRequest) -> dict:
    options = {"task_id": request.task_id, "init_state": request.init_state}
    if request.rng_state is not None:
        options["rng_state"] = request.rng_state
    return options


class RolloutCollector:
    def __init__(self, pool: EnvPool, policy: ChunkPolicy, config: CollectorConfig | None = None):
        self.pool = pool
        self.policy = policy
        self.config = config or CollectorConfig()
        if self.config.replan_steps > policy.action_horizon:
            raise ValueError(
                f"replan_steps {self.config.replan_steps} exceeds the policy's action horizon {policy.action_horizon}"
            )

    def collect(
        self, requests: Sequence[EpisodeRequest], desc: str = "rollouts"
    ) -> tuple[list[EpisodeResult], RolloutStats]:
        cfg = self.config
        results: list[EpisodeResult | None] = [None] * len(requests)
        attempts = [0] * len(requests)
        queue = deque(range(len(requests)))
        stats = RolloutStats()
        start = time.perf_counter()
        bar = tqdm(total=len(requests), desc=desc, unit="ep", disable=not cfg.progress, dynamic_ncols=True)
        wave = 0
        while queue:
            batch = [queue.popleft() for _ in range(min(self.pool.num_workers, len(queue)))]
            for i in batch:
                attempts[i] += 1
            slots = self._run_wave(batch, requests, wave, stats)
            for slot in slots:
                if slot.failed is None:
                    results[slot.index] = slot.result
                    bar.update(1)
                    stats.episodes += 1
                    stats.successes += int(slot.result.success)
                    continue
                stats.failed_attempts += 1
                retry = cfg.retry_env_errors or not slot.failed.startswith("error:")
                if retry and attempts[slot.index] <= cfg.max_retries:
                    queue.append(slot.index)
                else:
                    results[slot.index] = EpisodeResult(requests[slot.index], valid=False, failure=slot.failed)
                    bar.update(1)
            stats.wall_seconds = time.perf_counter() - start
            bar.set_postfix(steps_per_s=f"{stats.env_steps_per_s:.1f}", success=f"{stats.success_rate:.2f}")
            wave += 1
        bar.close()
        stats.wall_seconds = time.perf_counter() - start
        return [r for r in results if r is not None], stats

    # ------------------------------------------------------------------

    def _run_wave(
        self, batch: list[int], requests: Sequence[EpisodeRequest], wave: int, stats: RolloutStats
    ) -> list[_Slot]:
        cfg = self.config
        workers = list(range(len(batch)))
        reqs = [requests[i] for i in batch]
        t0 = time.perf_counter()
        resets = self.pool.reset(
            workers,
            seeds=[r.seed for r in reqs],
            options=[_reset_options(r) for r in reqs],
        )
        stats.env_seconds += time.perf_counter() - t0
        slots = []
        for i, req, out in zip(batch, reqs, resets, strict=True):
            slot = _Slot(i, req, {}, EpisodeResult(req))
            if isinstance(out, WorkerFailure):
                slot.failed, slot.done = out.reason, True
            else:
                slot.obs = out[0]
                if req.record_video:
                    slot.result.frames.append(out[0]["agentview"])
            slots.append(slot)

        for call in range(math.ceil(cfg.max_steps / cfg.replan_steps)):
            active = [s for s in slots if not s.done]
            if not active and not cfg.sync_horizon:
                break
            # with sync_horizon every call has the same batch: finished envs replay their last observation
            queried = [s for s in slots if s.obs] if cfg.sync_horizon else active
            if not queried:
                break
            t0 = time.perf_counter()
            inputs = self.policy.prepare([s.obs for s in queried], [s.request.prompt for s in queried])
            model_actions, env_actions, *extra = self.policy.act(inputs, seed=hash((cfg.seed, wave, call)) & 0x7FFFFFFF)
            records = extra[0] if extra else [None] * len(queried)
            stats.policy_seconds += time.perf_counter() - t0
            stats.policy_calls += 1
            rows = {id(s): k for k, s in enumerate(queried)}
            chunks = {}
            for s in active:
                k = rows[id(s)]
                padded = np.zeros_like(model_actions[k], dtype=np.float32)
                chunks[id(s)] = Chunk(inputs[k], padded, 0, s.result.length, records[k])
            for j in range(cfg.replan_steps):
                signals.check()  # a preempted run stops here, not after the iteration
                active = [s for s in active if not s.done]
                if not active:
                    break
                last = j == cfg.replan_steps - 1
                render = [last or s.request.record_video for s in active]
                t0 = time.perf_counter()
                outs = self.pool.step(
                    [slots.index(s) for s in active], [env_actions[rows[id(s)], j] for s in active], render
                )
                stats.env_seconds += time.perf_counter() - t0
                for s, out in zip(active, outs, strict=True):
                    if isinstance(out, WorkerFailure):
                        s.failed, s.done = out.reason, True
                        continue
                    obs, _, terminated, truncated, _ = out
                    chunk = chunks[id(s)]
                    chunk.actions[j] = model_actions[rows[id(s)], j]
                    chunk.num_executed += 1
                    s.result.length += 1
                    stats.env_steps += 1
                    if s.request.record_video and "agentview" in obs:
                        s.result.frames.append(obs["agentview"])
                    if "agentview" in obs:
                        s.obs = obs
                    else:  # keep the last rendered images; refresh proprio
                        s.obs = {**s.obs, **obs}
                    if terminated or truncated or s.result.length >= cfg.max_steps:
                        s.result.success = bool(terminated)
                        s.done = True
            for s in slots:
                if id(s) in chunks and s.failed is None and chunks[id(s)].num_executed:
                    s.result.chunks.append(chunks[id(s)])
        for s in slots:
            if s.failed is not None:
                s.result = EpisodeResult(s.request, valid=False, failure=s.failed)
        return slots
