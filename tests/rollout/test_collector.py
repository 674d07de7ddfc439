"""RolloutCollector on a fake LIBERO-shaped env in real subprocess workers, with fake chunk policies: lockstep and
pipelined collection, per-episode noise seeds, crashes and re-runs."""

from __future__ import annotations

import math
import os
import signal
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # workers unpickle the env factory by module name

from fake_libero import PointEnv  # noqa: E402

from pi0_lightning.envs.pool import EnvPool  # noqa: E402
from pi0_lightning.rollout.collector import CollectorConfig, RolloutCollector, noise_seed  # noqa: E402
from pi0_lightning.rollout.types import EpisodeRequest  # noqa: E402


class StepPolicy:
    """Moves +1 per action; model-space actions are random from the seed, so determinism is observable."""

    action_horizon = 4

    def __init__(self):
        self.batch_sizes: list[int] = []

    def prepare(self, observations, prompts):
        return [
            {"pos": int(o["pos"][0]), "image": int(o["agentview"][0, 0, 0]), "prompt": p}
            for o, p in zip(observations, prompts, strict=True)
        ]

    def act(self, inputs, seeds):
        self.batch_sizes.append(len(inputs))
        model = np.stack([np.random.default_rng(s).standard_normal((self.action_horizon, 3)) for s in seeds])
        env = np.ones((len(inputs), self.action_horizon, 7), np.float32)
        return model.astype(np.float32), env


def requests(n: int, start: int = 0):
    return [EpisodeRequest(task_id=0, init_state=start, prompt=f"task {i}", seed=i) for i in range(n)]


@pytest.fixture
def pool():
    with EnvPool(partial(PointEnv, goal=5), 2, timeout_s=20) as p:
        yield p


def collect(pool, reqs, **cfg):
    policy = StepPolicy()
    config = CollectorConfig(replan_steps=2, max_steps=8, progress=False, **cfg)
    results, stats = RolloutCollector(pool, policy, config).collect(reqs)
    return results, stats, policy


def test_chunks_pair_each_window_with_its_own_start_observation(pool):
    results, stats, _ = collect(pool, requests(3))
    assert [r.valid for r in results] == [True] * 3
    for r in results:
        assert r.success and r.length == 5  # 0 -> 5 in five +1 steps
        assert [c.step for c in r.chunks] == [0, 2, 4]
        assert [c.num_executed for c in r.chunks] == [2, 2, 1]
        for c in r.chunks:
            # the chunk's stored input is the observation at its own start, images included (rendered on demand)
            assert c.inputs["pos"] == c.step and c.inputs["image"] == c.step
            assert c.actions.shape == (4, 3)
            assert not c.actions[c.num_executed :].any() and c.actions[: c.num_executed].all()
            assert c.action_mask.sum() == c.num_executed
    assert stats.episodes == 3 and stats.successes == 3 and stats.env_steps == 15


def test_failure_to_succeed_is_truncated_at_max_steps(pool):
    results, _, _ = collect(pool, [EpisodeRequest(task_id=9, init_state=0, prompt="far")])
    assert not results[0].success and results[0].length == 8 and len(results[0].chunks) == 4


def test_sync_horizon_makes_the_same_calls_every_wave(pool):
    _, _, free = collect(pool, requests(2))
    _, _, synced = collect(pool, requests(2), sync_horizon=True)
    assert free.batch_sizes == [2, 2, 2]  # stops when both episodes are done
    assert synced.batch_sizes == [2, 2, 2, 2]  # ceil(8 / 2) calls regardless


def test_same_seeds_give_same_rollouts(pool):
    a, _, _ = collect(pool, requests(3), seed=5)
    b, _, _ = collect(pool, requests(3), seed=5)
    c, _, _ = collect(pool, requests(3), seed=6)
    flat = lambda rs: np.concatenate([ch.actions for r in rs for ch in r.chunks])  # noqa: E731
    assert np.array_equal(flat(a), flat(b)) and not np.array_equal(flat(a), flat(c))


def test_video_frames_every_step(pool):
    reqs = [EpisodeRequest(0, 0, "v", record_video=True), EpisodeRequest(0, 0, "no video")]
    results, _, _ = collect(pool, reqs)
    assert [int(f[0, 0, 0]) for f in results[0].frames] == list(range(6))
    assert results[1].frames == []


def test_crashed_worker_is_replaced_and_its_episode_rerun(tmp_path):
    flag = tmp_path / "crash"
    flag.write_text("once")
    with EnvPool(partial(PointEnv, goal=5, crash_flag=str(flag)), 2, timeout_s=20) as pool:
        results, stats, _ = collect(pool, requests(2))
        assert pool.restarts == 1
    assert stats.failed_attempts == 1
    assert all(r.valid and r.success and r.length == 5 for r in results)
    assert [r.request.prompt for r in results] == ["task 0", "task 1"]


def test_episode_reported_invalid_when_retries_run_out(tmp_path):
    flag = tmp_path / "crash"
    flag.write_text("once")
    with EnvPool(partial(PointEnv, goal=5, crash_flag=str(flag)), 1, timeout_s=20) as pool:
        results, stats, _ = collect(pool, requests(1), max_retries=0)
    assert not results[0].valid and "crashed" in results[0].failure and results[0].chunks == []
    assert stats.episodes == 0 and stats.failed_attempts == 1


@pytest.mark.parametrize(("retry", "attempts"), [(True, 3), (False, 1)])
def test_env_errors_end_the_episode_in_evaluation_and_count_as_failures(retry, attempts):
    """Training retries an episode whose env raised; evaluation (as openpi) ends it at once, and the success rate
    counts it as a failure."""
    import torch

    from pi0_lightning.rollout.metrics import TaskSuccessRate, count_episodes

    reqs = [EpisodeRequest(task_id=t, init_state=0, prompt=f"task {t}", seed=t) for t in (0, 1)]
    with EnvPool(partial(PointEnv, goal=2, raise_task=1), 2, timeout_s=20) as pool:
        results, stats, _ = collect(pool, reqs, retry_env_errors=retry)
    ok, raised = results
    assert ok.valid and ok.success
    assert not raised.valid and "simulated env error" in raised.failure and stats.failed_attempts == attempts
    metric = TaskSuccessRate(2)
    count_episodes(metric, results)
    out = metric.compute()
    assert out["episodes"].tolist() == [1, 1] and out["successes"].tolist() == [1, 0]
    assert float(out["overall"]) == pytest.approx(0.5) and torch.isclose(out["per_task"][1], torch.tensor(0.0).double())


def test_replan_longer_than_horizon_is_rejected(pool):
    with pytest.raises(ValueError, match="exceeds the policy's action horizon"):
        RolloutCollector(pool, StepPolicy(), CollectorConfig(replan_steps=5))


class RecordingPolicy(StepPolicy):
    """Also returns one record per row (as PI0-FAST does with its sampled tokens)."""

    def act(self, inputs, seeds):
        model, env = super().act(inputs, seeds)
        return model, env, [("record", x["pos"], s) for x, s in zip(inputs, seeds, strict=True)]


def test_per_row_records_are_kept_with_their_chunks(pool):
    config = CollectorConfig(replan_steps=2, max_steps=8, progress=False)
    results, _ = RolloutCollector(pool, RecordingPolicy(), config).collect(requests(2))
    for r in results:
        assert [c.record[:2] for c in r.chunks] == [("record", c.step) for c in r.chunks]


# ----------------------------------------------------------------------------------------------------------------
# Pipelined collection and per-episode noise seeds


class SeededPointEnv(PointEnv):
    """PointEnv whose start also depends on the reset seed (init_state + seed % 3), and whose observations carry the
    steps since the reset ("t"). Deterministic: (task, init state, seed, actions) fix the episode. If `raise_flag`
    names an existing file, the first worker to claim it raises inside its second step of an episode."""

    def __init__(self, raise_flag: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.raise_flag = raise_flag

    def step(self, action):
        if self.raise_flag and self.steps == 1:
            try:
                os.rename(self.raise_flag, self.raise_flag + ".claimed")
            except FileNotFoundError:
                pass
            else:
                raise RuntimeError("simulated env error")
        return super().step(action)

    def reset(self, *, seed=None, options=None):
        options = dict(options or {})
        options["init_state"] = int(options["init_state"]) + (seed or 0) % 3
        return super().reset(seed=seed, options=options)

    def _obs(self) -> dict:
        return {**super()._obs(), "t": np.array([self.steps])}


class NoisyPolicy:
    """Actions from the row's seed and observation only: moves of 0, 1 or 2 per step (so episode lengths and outcomes
    vary), Gaussian model actions; the record is the row's seed. `kill` = (call number, pid getter) SIGKILLs a
    worker while the policy computes (other groups' rounds in flight)."""

    action_horizon = 4

    def __init__(self, kill=None):
        self.calls: list[list[tuple[int, int]]] = []  # per call: (t, seed) of each row
        self.kill = kill

    def prepare(self, observations, prompts):
        pairs = zip(observations, prompts, strict=True)
        return [{"pos": int(o["pos"][0]), "t": int(o["t"][0]), "prompt": p} for o, p in pairs]

    def act(self, inputs, seeds):
        self.calls.append([(x["t"], s) for x, s in zip(inputs, seeds, strict=True)])
        if self.kill is not None and len(self.calls) == self.kill[0]:
            os.kill(self.kill[1](), signal.SIGKILL)
        model, env = [], []
        for x, s in zip(inputs, seeds, strict=True):
            rng = np.random.default_rng([s, x["pos"]])
            model.append(rng.standard_normal((self.action_horizon, 3)))
            e = np.zeros((self.action_horizon, 7))
            e[:, 0] = rng.integers(0, 3, self.action_horizon)
            env.append(e)
        return np.stack(model).astype(np.float32), np.stack(env).astype(np.float32), list(seeds)


def varied_requests(n: int) -> list[EpisodeRequest]:
    return [EpisodeRequest(task_id=i % 4, init_state=i % 3, prompt=f"task {i % 4}", seed=i) for i in range(n)]


def run(pool, reqs, kill=None, **cfg):
    policy = NoisyPolicy(kill)
    config = CollectorConfig(replan_steps=2, max_steps=10, progress=False, **cfg)
    results, stats = RolloutCollector(pool, policy, config).collect(reqs)
    return results, stats, policy


def episodes(results) -> list:
    """Everything an episode produced: outcome, length and per chunk its step, length, input, actions and seed."""
    return [
        (r.request.seed, r.valid, r.success, r.length,
         [(c.step, c.num_executed, c.inputs["pos"], c.inputs["t"], c.actions.tobytes(), c.record) for c in r.chunks])
        for r in results
    ]  # fmt: skip


def mixes_fresh_and_running(call) -> bool:
    return len({t == 0 for t, _ in call}) == 2


@pytest.fixture(scope="module")
def seeded_pool():
    with EnvPool(partial(SeededPointEnv, goal=5), 4, timeout_s=20) as p:
        yield p


@pytest.fixture(scope="module")
def lockstep(seeded_pool):
    return run(seeded_pool, varied_requests(16))


def test_noise_seed_is_per_episode_and_chunk():
    assert noise_seed(0, 3, 2) == noise_seed(0, 3, 2) == 2819337326339803526  # pinned: rollouts stay reproducible
    seeds = {noise_seed(s, i, c) for s in (0, 1) for i in range(20) for c in range(20)}
    assert len(seeds) == 800 and all(0 <= s < 2**63 for s in seeds)
    assert noise_seed(0, 3, 2, env_errors=1) not in seeds | {noise_seed(0, 3, 2, env_errors=2)}
    assert noise_seed(-1, 0, 0) == noise_seed(2**64 - 1, 0, 0)


def test_lockstep_rows_are_seeded_by_episode_and_chunk(lockstep):
    results, stats, policy = lockstep
    outcomes = {(r.success, r.length) for r in results}
    assert any(s for s, _ in outcomes) and not all(s for s, _ in outcomes) and len({n for _, n in outcomes}) > 3
    for i, r in enumerate(results):
        assert r.request.seed == i  # in request order
        assert [c.record for c in r.chunks] == [noise_seed(0, i, k) for k in range(len(r.chunks))]
        assert r.chunks[0].inputs["pos"] == r.request.init_state + r.request.seed % 3  # the env seed reached it
    assert max(map(len, policy.calls)) == 4 and not any(map(mixes_fresh_and_running, policy.calls))  # waves


@pytest.mark.parametrize("groups", [2, 3])
def test_pipelined_collection_gives_the_lockstep_episodes(seeded_pool, lockstep, groups):
    results, stats, policy = run(seeded_pool, varied_requests(16), pipeline_groups=groups)
    assert episodes(results) == episodes(lockstep[0])
    assert stats.episodes == 16 and stats.env_steps == lockstep[1].env_steps and seeded_pool.restarts == 0
    # one group per policy call: never more rows than the largest group has workers (whether a group's episodes
    # share a call depends on how their resets and chunks interleave in time)
    assert max(map(len, policy.calls)) <= math.ceil(4 / groups)
    if groups == 2:  # no wave barrier: a fresh episode joins a group whose other episode is running
        assert any(map(mixes_fresh_and_running, policy.calls))


def test_pipelined_collection_is_reproducible_run_to_run(seeded_pool):
    a, _, _ = run(seeded_pool, varied_requests(8), pipeline_groups=2, seed=5)
    b, _, _ = run(seeded_pool, varied_requests(8), pipeline_groups=2, seed=5)
    c, _, _ = run(seeded_pool, varied_requests(8), pipeline_groups=2, seed=6)
    assert episodes(a) == episodes(b) and episodes(a) != episodes(c)


@pytest.mark.parametrize("how", ["exit inside a step", "SIGKILL while the policy runs"])
def test_worker_lost_mid_pipeline_is_replaced_and_its_episode_rerun_identically(tmp_path, lockstep, how):
    flag = tmp_path / "crash"
    if how == "exit inside a step":
        flag.write_text("once")  # the first worker past 3 steps of an episode exits
    with EnvPool(partial(SeededPointEnv, goal=5, crash_flag=str(flag), crash_at=3), 4, timeout_s=20) as pool:
        kill = (5, lambda: pool._procs[3].pid) if how.startswith("SIGKILL") else None
        results, stats, _ = run(pool, varied_requests(16), kill=kill, pipeline_groups=2)
        assert pool.restarts == 1
    assert stats.failed_attempts == 1 and stats.episodes == 16
    assert episodes(results) == episodes(lockstep[0])


def test_env_error_rerun_gets_fresh_noise(tmp_path, lockstep):
    """Training re-runs an episode whose env raised with noise seeded by its env-error count (the same noise would
    likely replay the error); every other episode is untouched."""
    flag = tmp_path / "raise"
    flag.write_text("once")
    with EnvPool(partial(SeededPointEnv, goal=5, raise_flag=str(flag)), 4, timeout_s=20) as pool:
        results, stats, _ = run(pool, varied_requests(16), pipeline_groups=2)
        assert pool.restarts == 1
    assert stats.failed_attempts == 1 and all(r.valid for r in results)
    rerun = [i for i, r in enumerate(results) if r.chunks[0].record != noise_seed(0, i, 0)]
    assert len(rerun) == 1
    (i,) = rerun
    assert [c.record for c in results[i].chunks] == [noise_seed(0, i, k, 1) for k in range(len(results[i].chunks))]
    others = [k for k in range(16) if k != i]
    assert [episodes(results)[k] for k in others] == [episodes(lockstep[0])[k] for k in others]


def test_sync_horizon_needs_lockstep(pool):
    with pytest.raises(ValueError, match="sync_horizon needs lockstep"):
        RolloutCollector(pool, StepPolicy(), CollectorConfig(replan_steps=2, pipeline_groups=2, sync_horizon=True))
    with pytest.raises(ValueError, match="pipeline_groups must be at least 1"):
        RolloutCollector(pool, StepPolicy(), CollectorConfig(replan_steps=2, pipeline_groups=0))


def test_pipelined_groups_clamp_to_the_workers_and_keep_videos(pool):
    reqs = [EpisodeRequest(0, 0, "v", record_video=True), EpisodeRequest(0, 0, "no video"), *requests(3)]
    results, stats, policy = collect(pool, reqs, pipeline_groups=5)  # 2 workers: 2 groups of one
    assert [int(f[0, 0, 0]) for f in results[0].frames] == list(range(6)) and results[1].frames == []
    assert all(r.valid and r.success and r.length == 5 for r in results) and set(policy.batch_sizes) == {1}


class TimedPointEnv(PointEnv):
    """Reports a fixed reset time, as LiberoEnv reports the time its reset took in the worker."""

    def reset(self, *, seed=None, options=None):
        obs, info = super().reset(seed=seed, options=options)
        return obs, {**info, "reset_seconds": 0.25}


@pytest.mark.parametrize("groups", [1, 2])
def test_reset_time_reported_by_the_env_is_summed_over_episodes(groups):
    with EnvPool(partial(TimedPointEnv, goal=5), 2, timeout_s=20) as p:
        _, stats, _ = collect(p, requests(3), pipeline_groups=groups)
    assert stats.reset_seconds == pytest.approx(0.75) and stats.as_dict()["reset_seconds"] == pytest.approx(0.75)
