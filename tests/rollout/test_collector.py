"""RolloutCollector on a fake LIBERO-shaped env in real subprocess workers, with a fake chunk policy."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # workers unpickle the env factory by module name

from fake_libero import PointEnv  # noqa: E402

from pi0_lightning.envs.pool import EnvPool  # noqa: E402
from pi0_lightning.rollout.collector import CollectorConfig, RolloutCollector  # noqa: E402
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

    def act(self, inputs, seed):
        self.batch_sizes.append(len(inputs))
        rng = np.random.default_rng(seed)
        model = rng.standard_normal((len(inputs), self.action_horizon, 3)).astype(np.float32)
        env = np.ones((len(inputs), self.action_horizon, 7), np.float32)
        return model, env


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

    def act(self, inputs, seed):
        model, env = super().act(inputs, seed)
        return model, env, [("record", x["pos"], seed) for x in inputs]


def test_per_row_records_are_kept_with_their_chunks(pool):
    config = CollectorConfig(replan_steps=2, max_steps=8, progress=False)
    results, _ = RolloutCollector(pool, RecordingPolicy(), config).collect(requests(2))
    for r in results:
        assert [c.record[:2] for c in r.chunks] == [("record", c.step) for c in r.chunks]
