"""Batched rollouts over a pool of subprocess environments, in lockstep waves or pipelined over groups of workers.

Chunks
------
The policy is called once per chunk for a batch of envs (`prepare`, then one batched `act`). Each env executes the
first `replan_steps` actions of its chunk (openpi's LIBERO protocol: replan every 5 steps, never 50 actions
open-loop) in one pool command (`Command.steps`: the worker runs them back to back and stops at the end of the
episode), and the collector records for each executed chunk its own start observation and the executed normalised
actions padded to the model horizon. Cameras are rendered only for observations the policy will consume (chunk
starts) or for videos.

Lockstep (`pipeline_groups=1`)
------------------------------
Episodes run in *waves*: each wave gives one episode request to each of up to N workers. Per chunk there is one
policy call for all envs of the wave, then one round in which they all execute their chunks; the next wave starts
once every episode of the wave has ended. `sync_horizon=True` keeps every wave at a fixed number of policy calls
(ceil(max_steps / replan_steps)), feeding finished envs their last observation and discarding their actions, so that
distributed ranks make the same forward calls; otherwise a wave stops as soon as all of its episodes have ended.

Pipelined (`pipeline_groups=G >= 2`)
------------------------------------
The workers are split into G contiguous groups (sizes differing by at most one). Each group cycles through a policy
call for its running episodes and one round in which its workers execute their chunks. Rounds are submitted without
waiting for their replies (`EnvPool.submit`), so while the policy computes one group's chunks the other groups'
workers step theirs, and the policy serves the groups in the order their rounds complete. There is no wave barrier:
as soon as a round shows that an episode ended, its worker takes the next request from the shared queue and resets
in a round of its own while the group goes on, and the new episode joins the group's first policy call after its
reset has come back. The policy thus waits for no worker outside the group it serves, and a group never waits for a
reset. Policy batches have the group's size or fewer (episodes resetting or ended, an empty queue), so a policy that
captures one CUDA graph per batch size sees every size up to the group's. `sync_horizon=True` is rejected
(ValueError): the number of policy calls depends on how episodes end across groups, so distributed ranks could not
be held at equal forward-call counts.

Reproducibility
---------------
The policy noise is seeded per episode and per chunk, never by batch position: chunk c of `requests[i]` gets
`noise_seed(config.seed, i, c)`, and the policy draws each row's noise from that row's seed alone
(`ChunkPolicy.act`). Env seeds (or random-stream states) come with the requests. The same requests and seeds
therefore give the same rollouts however they are batched: lockstep or pipelined, any group or worker count, any
worker (for a deterministic env, and up to floating-point differences of batched kernels on the policy side).

Failures
--------
A worker that crashes or hangs is replaced by the pool; its episode is discarded and re-queued (up to
`max_retries` times, then reported as invalid). The re-run has the noise seeds of the first attempt: a crash or hang
comes from the machine, not from the episode, so a deterministic env replays exactly the episode an undisturbed run
would have produced. An episode whose env raised is re-queued likewise for training rollouts, but with fresh noise
(the number of its earlier env errors enters the seed): an env exception usually comes from the trajectory itself
(unstable physics, say), which the same noise would replay. Evaluation (`retry_env_errors=False`) ends such an
episode at once, as openpi does, and counts it as a failure. An exception in the collector itself (a preemption
signal, Ctrl-C, a policy error) gathers the rounds still in flight before it propagates, so the pool stays usable.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from pi0_lightning import signals
from pi0_lightning.envs.pool import Command, EnvPool, Round, WorkerFailure
from pi0_lightning.rollout.types import Chunk, ChunkPolicy, EpisodeRequest, EpisodeResult, RolloutStats


@dataclass
class CollectorConfig:
    replan_steps: int = 5
    """Actions executed from each predicted chunk before replanning (openpi LIBERO: 5)."""
    max_steps: int = 220
    """Policy steps per episode (after the env's wait steps)."""
    sync_horizon: bool = False
    """Fixed number of policy calls per wave (needed for lockstep across distributed ranks); lockstep only."""
    pipeline_groups: int = 1
    """Worker groups for pipelined collection: while the policy computes one group's chunks the other groups'
    workers execute theirs, and a worker whose episode ended starts the next queued one at once (no wave barrier).
    1: lockstep waves. At most one group per worker (larger values are clamped). Not with `sync_horizon`."""
    max_retries: int = 2
    """Re-runs of an episode whose worker crashed or hung before it is reported invalid."""
    retry_env_errors: bool = True
    """Also re-run an episode whose env raised; False (evaluation, as openpi) ends it there as invalid."""
    seed: int = 0
    """Base seed of the policy noise (see `noise_seed`)."""
    progress: bool = True
    """Show a progress bar (episodes, env steps/s, success)."""


def noise_seed(seed: int, index: int, chunk: int, env_errors: int = 0) -> int:
    """The policy-noise seed of chunk `chunk` (0, 1, ... within the episode) of request `index` (its position in the
    requests given to `collect`) under the base seed `seed`. `env_errors`, the number of earlier attempts of the
    episode that ended in an env exception, gives a training re-run fresh noise; crashed or hung attempts do not
    count, so their re-run repeats the undisturbed episode. A 63-bit int from numpy's `SeedSequence`."""
    entropy = [seed % 2**64, index, chunk] + ([env_errors] if env_errors else [])
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass
class _Slot:
    """One attempt of an episode, on one worker."""

    index: int
    request: EpisodeRequest
    env_errors: int
    result: EpisodeResult
    obs: dict = field(default_factory=dict)
    started: bool = False
    """Its reset has come back (successfully or not)."""
    done: bool = False
    failed: str | None = None
    calls: int = 0
    """Policy calls made for it: the chunk index of its next one."""


@dataclass
class _Work:
    """What one worker does in a round: the reset of `slot` (`chunk` None) or the steps of `chunk`."""

    worker: int
    slot: _Slot
    chunk: Chunk | None = None
    model_actions: np.ndarray | None = None
    """(H, D) model-space actions of the chunk."""
    env_actions: np.ndarray | None = None
    """(H, 7) env actions of the chunk."""


@dataclass
class _Group:
    workers: list[int]
    slots: dict[int, _Slot] = field(default_factory=dict)
    """worker -> the episode it runs."""
    busy: bool = False
    """Its round (lockstep: resets or chunks; pipelined: chunks) is in flight."""
    queued: bool = True
    """Waiting for its turn with the policy."""
    wave_calls: int = 0
    """Policy calls of the current wave (lockstep)."""


@dataclass
class _Flight:
    """A round in flight: a group's round, or (pipelined) the reset of one of its workers."""

    round: Round
    group: _Group
    work: list[_Work]
    group_round: bool


_SUBMITTED, _AGAIN, _WAITING, _IDLE = "submitted", "again", "waiting", "idle"


def _reset_options(request: EpisodeRequest) -> dict:
    options = {"task_id": request.task_id, "init_state": request.init_state}
    if request.rng_state is not None:
        options["rng_state"] = request.rng_state
    if request.hard_reset is not None:
        options["hard_reset"] = request.hard_reset
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
        if self.config.pipeline_groups < 1:
            raise ValueError(f"pipeline_groups must be at least 1, got {self.config.pipeline_groups}")
        if self.config.pipeline_groups > 1 and self.config.sync_horizon:
            raise ValueError(
                "sync_horizon needs lockstep collection (pipeline_groups=1): pipelined groups make a number of "
                "policy calls that depends on how the episodes end, so distributed ranks cannot be kept in step"
            )

    def collect(
        self, requests: Sequence[EpisodeRequest], desc: str = "rollouts"
    ) -> tuple[list[EpisodeResult], RolloutStats]:
        """Run every request (in any order, on any worker) and return the results in the order of `requests`."""
        return _Collection(self, requests, desc).run()


class _Collection:
    """The state of one `RolloutCollector.collect` call."""

    def __init__(self, collector: RolloutCollector, requests: Sequence[EpisodeRequest], desc: str):
        self.pool, self.policy, self.cfg = collector.pool, collector.policy, collector.config
        self.requests = requests
        self.results: list[EpisodeResult | None] = [None] * len(requests)
        self.attempts = [0] * len(requests)
        self.env_errors = [0] * len(requests)
        self.queue = deque(range(len(requests)))
        self.stats = RolloutStats()
        self.lockstep = self.cfg.pipeline_groups == 1
        self.horizon = math.ceil(self.cfg.max_steps / self.cfg.replan_steps)
        n = self.pool.num_workers
        g = min(self.cfg.pipeline_groups, n)
        bounds = [round(k * n / g) for k in range(g + 1)]
        self.groups = [_Group(list(range(bounds[k], bounds[k + 1]))) for k in range(g)]
        self.bar = tqdm(total=len(requests), desc=desc, unit="ep", disable=not self.cfg.progress, dynamic_ncols=True)
        self.start = time.perf_counter()

    def run(self) -> tuple[list[EpisodeResult], RolloutStats]:
        self.ready: deque[_Group] = deque(self.groups)  # waiting for the policy, in the order they got ready
        self.flights: list[_Flight] = []
        idle: list[_Group] = []  # nothing to do unless a failed episode is re-queued
        try:
            while True:
                if self.queue and idle:
                    for group in idle:
                        self._enqueue(group)
                    idle.clear()
                if self.ready:
                    group = self.ready.popleft()
                    group.queued = False
                    status = self._turn(group)
                    if status == _AGAIN:
                        self._enqueue(group)
                    elif status == _IDLE:
                        idle.append(group)
                    self._gather_done(timeout=0.0)  # groups line up in the order their rounds complete
                    continue
                if not self.flights:
                    break
                self._gather_done(timeout=None)
        except BaseException:
            self._abandon()
            raise
        finally:
            self.bar.close()
        self.stats.wall_seconds = time.perf_counter() - self.start
        return [r for r in self.results if r is not None], self.stats

    # ------------------------------------------------------------------ scheduling

    def _turn(self, group: _Group) -> str:
        """A group without its round in flight: retire its ended episodes, start new ones, call the policy for its
        running ones and submit the round that steps (lockstep: or resets) its workers."""
        cfg = self.cfg
        signals.check()  # a preempted run stops here, not after the iteration
        if self.lockstep:
            if group.slots and self._wave_over(group):
                for slot in group.slots.values():
                    self._finish(slot)
                group.slots.clear()
                group.wave_calls = 0
            if not group.slots:
                for w in group.workers[: len(self.queue)]:
                    group.slots[w] = self._start(self.queue.popleft())
        else:
            self._refill(group)
        if not group.slots:
            return _IDLE

        active = {w: s for w, s in group.slots.items() if s.started and not s.done}
        # with sync_horizon every call has the same batch: finished envs replay their last observation
        queried = {w: s for w, s in group.slots.items() if s.obs} if self.lockstep and cfg.sync_horizon else active
        work = []
        if queried:
            inputs, model_actions, env_actions, records = self._act(list(queried.values()))
            group.wave_calls += 1
            for k, (w, slot) in enumerate(queried.items()):
                if w in active:
                    padded = np.zeros_like(model_actions[k], dtype=np.float32)
                    chunk = Chunk(inputs[k], padded, 0, slot.result.length, records[k])
                    work.append(_Work(w, slot, chunk, model_actions[k], env_actions[k]))
                    slot.calls += 1
        if self.lockstep:
            work += [_Work(w, s) for w, s in group.slots.items() if not s.started]
        if work:
            self._submit(group, work, group_round=True)
            return _SUBMITTED
        # lockstep: a sync_horizon call for finished envs only; pipelined: every episode of the group is resetting
        return _AGAIN if self.lockstep else _WAITING

    def _refill(self, group: _Group) -> None:
        """Pipelined: retire the group's ended episodes and start queued ones on its free workers, each with a
        reset round of its own (the group's chunks do not wait for it; the episode joins the group's next policy
        call after its reset has come back)."""
        for w in group.workers:
            slot = group.slots.get(w)
            if slot is not None and slot.done:
                self._finish(slot)
                del group.slots[w]
            if w not in group.slots and self.queue:
                group.slots[w] = slot = self._start(self.queue.popleft())
                self._submit(group, [_Work(w, slot)], group_round=False)

    def _submit(self, group: _Group, work: list[_Work], group_round: bool) -> None:
        cfg = self.cfg
        commands = []
        for item in work:
            if item.chunk is None:
                req = item.slot.request
                commands.append(Command.reset(req.seed, _reset_options(req)))
                continue
            n = min(cfg.replan_steps, cfg.max_steps - item.slot.result.length)
            render = [item.slot.request.record_video or j == cfg.replan_steps - 1 for j in range(n)]
            commands.append(Command.steps(list(item.env_actions[:n]), render))
        rnd = self.pool.submit([item.worker for item in work], commands)
        self.flights.append(_Flight(rnd, group, work, group_round))
        group.busy = group.busy or group_round

    def _enqueue(self, group: _Group) -> None:
        if not group.queued:
            group.queued = True
            self.ready.append(group)

    def _wave_over(self, group: _Group) -> bool:
        slots = group.slots.values()
        if not self.cfg.sync_horizon:
            return all(s.done for s in slots)
        return group.wave_calls >= self.horizon or not any(s.obs for s in slots)

    def _gather_done(self, timeout: float | None) -> None:
        """Gather the rounds that are complete (waiting up to `timeout` for one); a group whose own round is not in
        flight lines up for the policy."""
        if not self.flights:
            return
        t0 = time.perf_counter()
        done = {id(r) for r in self.pool.wait([f.round for f in self.flights], timeout)}
        for flight in [f for f in self.flights if id(f.round) in done]:
            self.flights.remove(flight)
            self._absorb(flight.work, self.pool.gather(flight.round))
            if flight.group_round:
                flight.group.busy = False
                if not self.lockstep:  # freed workers start their next episode now, not at the group's turn
                    self._refill(flight.group)
            if not flight.group.busy:
                self._enqueue(flight.group)
        self.stats.env_seconds += time.perf_counter() - t0

    def _abandon(self) -> None:
        """After an exception: gather (and drop) the rounds in flight, so that the pool's workers are free again."""
        for flight in self.flights:
            if not flight.round.gathered and not self.pool.closed:
                with contextlib.suppress(Exception):
                    self.pool.gather(flight.round)
        self.flights.clear()

    # ------------------------------------------------------------------ episodes

    def _start(self, index: int) -> _Slot:
        self.attempts[index] += 1
        request = self.requests[index]
        return _Slot(index, request, self.env_errors[index], EpisodeResult(request))

    def _act(self, slots: list[_Slot]) -> tuple[list, np.ndarray, np.ndarray, list]:
        """One policy call: (inputs, model actions, env actions, records); row k is seeded by its episode and the
        chunk index (`noise_seed`)."""
        cfg = self.cfg
        seeds = [noise_seed(cfg.seed, s.index, s.calls, s.env_errors) for s in slots]
        t0 = time.perf_counter()
        inputs = self.policy.prepare([s.obs for s in slots], [s.request.prompt for s in slots])
        model_actions, env_actions, *extra = self.policy.act(inputs, seeds)
        self.stats.policy_seconds += time.perf_counter() - t0
        self.stats.policy_calls += 1
        return inputs, model_actions, env_actions, extra[0] if extra else [None] * len(slots)

    def _absorb(self, work: list[_Work], outs: list) -> None:
        """Apply a gathered round: first observations of reset episodes, executed steps of chunks."""
        cfg, stats = self.cfg, self.stats
        for item, out in zip(work, outs, strict=True):
            slot = item.slot
            if isinstance(out, WorkerFailure):
                slot.failed, slot.done, slot.started = out.reason, True, True
                continue
            if item.chunk is None:
                slot.started, slot.obs = True, out[0]
                stats.reset_seconds += float(out[1].get("reset_seconds", 0.0))
                if slot.request.record_video:
                    slot.result.frames.append(out[0]["agentview"])
                continue
            chunk = item.chunk
            for j, (obs, _, terminated, truncated, _) in enumerate(out):
                chunk.actions[j] = item.model_actions[j]
                chunk.num_executed += 1
                slot.result.length += 1
                stats.env_steps += 1
                if slot.request.record_video and "agentview" in obs:
                    slot.result.frames.append(obs["agentview"])
                if "agentview" in obs:
                    slot.obs = obs
                else:  # keep the last rendered images; refresh proprio
                    slot.obs = {**slot.obs, **obs}
                if terminated or truncated or slot.result.length >= cfg.max_steps:
                    slot.result.success = bool(terminated)
                    slot.done = True
                    break
            if chunk.num_executed:
                slot.result.chunks.append(chunk)

    def _finish(self, slot: _Slot) -> None:
        """Record an ended attempt: its result, or a re-queue / an invalid result if it failed."""
        cfg, stats = self.cfg, self.stats
        if slot.failed is None:
            self.results[slot.index] = slot.result
            stats.episodes += 1
            stats.successes += int(slot.result.success)
        else:
            stats.failed_attempts += 1
            env_error = slot.failed.startswith("error:")
            self.env_errors[slot.index] += int(env_error)
            if (cfg.retry_env_errors or not env_error) and self.attempts[slot.index] <= cfg.max_retries:
                self.queue.append(slot.index)
                return
            self.results[slot.index] = EpisodeResult(slot.request, valid=False, failure=slot.failed)
        self.bar.update(1)
        stats.wall_seconds = time.perf_counter() - self.start
        self.bar.set_postfix(steps_per_s=f"{stats.env_steps_per_s:.1f}", success=f"{stats.success_rate:.2f}")
