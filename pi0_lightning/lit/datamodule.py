"""RolloutDataModule: one epoch = one RL iteration, collected with the current policy in `train_dataloader()`.

`setup()` builds this rank's env worker pool once (the model never enters a worker). Every epoch Lightning reloads
the train loader (`reload_dataloaders_every_n_epochs=1`, set by the CLI), which runs dynamic sampling
(`rl/sampling.py`): rounds of K rollouts per context from this rank's shard, RLOO per group, useful groups kept until
every rank holds its quota or the round budget is spent; then the chunks of the kept groups become training samples,
padded with masked copies so every rank has the same number of batches. Validation shards the official evaluation
episodes across ranks (padded with masked filler episodes) and runs them in `PI0RLModule.validation_step`; LIBERO
evaluation follows openpi's seeding (`evaluate.openpi_streams`), training rollouts seed each episode's reset.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict
from functools import partial
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from pi0_lightning.data.samples import SampleDataset, chunk_samples, collate, group_episodes, pad_samples
from pi0_lightning.envs.pool import EnvPool
from pi0_lightning.envs.spec import EnvConfig, EnvSpec, build_env_spec
from pi0_lightning.rl.sampling import Context, ContextSampler, SamplingConfig, all_reduce_max, all_reduce_min
from pi0_lightning.rollout.collector import CollectorConfig, RolloutCollector
from pi0_lightning.rollout.types import EpisodeRequest


def _identity(x):
    return x


class RolloutDataModule(L.LightningDataModule):
    def __init__(
        self,
        env: EnvConfig | None = None,
        sampling: SamplingConfig | None = None,
        replan_steps: int = 5,
        batch_size: int = 8,
        repeats: int = 1,
        eval_tasks: str | None = None,
        eval_episodes: int = 5,
        video_episodes: int = 1,
        seed: int = 0,
        progress: bool = True,
    ):
        """
        Args:
            env: which environment, tasks and workers.
            sampling: RLOO group size, per-rank quota of useful groups, dynamic-sampling budget.
            replan_steps: actions executed per predicted chunk (openpi LIBERO: 5); the same for rollouts and loss.
            batch_size: chunks per training micro-batch.
            repeats: passes over the iteration's chunks (each with fresh flow-matching noise and time); RIPT's
                "PPO epochs" analogue. Rollouts stay on-policy only for the first pass.
            eval_tasks: task ids for validation (default: the training tasks).
            eval_episodes: validation episodes per task (official init states 0..N-1).
            video_episodes: episodes per task recorded as video during validation (0 = none).
            seed: base seed of context order and policy noise.
            progress: show rollout progress bars.
        """
        super().__init__()
        self.env_config = env or EnvConfig()
        self.sampling = sampling or SamplingConfig()
        self.replan_steps = replan_steps
        self.batch_size = batch_size
        self.repeats = repeats
        self.eval_tasks = eval_tasks
        self.eval_episodes = eval_episodes
        self.video_episodes = video_episodes
        self.seed = seed
        self.progress = progress
        self.spec: EnvSpec | None = None
        self.pool: EnvPool | None = None
        self.sampler: ContextSampler | None = None
        self._sampler_states: list[dict] | None = None
        self._streams: dict[int, list] | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def setup(self, stage: str) -> None:
        if self.spec is None:
            self.spec = build_env_spec(self.env_config)
        if self.sampler is None:
            contexts = [Context(t.task_id, k) for t in self.spec.tasks for k in range(self.spec.init_states_per_task)]
            s = self.sampling
            self.sampler = ContextSampler(
                contexts,
                self.rank,
                self.world_size,
                seed=self.seed,
                skip_solved=s.skip_solved,
                history_len=s.group_size,
                max_skips=s.max_skips,
            )
            if self._sampler_states is not None and len(self._sampler_states) == self.world_size:
                self.sampler.load_state_dict(self._sampler_states[self.rank])
        if self.pool is None or self.pool.closed:
            env_vars = {"MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"), "OMP_NUM_THREADS": "1"}
            self.pool = EnvPool(
                self.spec.factory,
                self.env_config.num_workers,
                timeout_s=self.env_config.worker_timeout,
                start_method=self.env_config.start_method,
                env_vars=env_vars,
            )

    def teardown(self, stage: str) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def prompts(self) -> dict[int, str]:
        return {t.task_id: t.language for t in self.spec.tasks}

    def collector(self, policy, seed: int, evaluation: bool = False) -> RolloutCollector:
        cfg = CollectorConfig(
            replan_steps=self.replan_steps,
            max_steps=self.spec.max_steps,
            sync_horizon=self.world_size > 1,
            retry_env_errors=not evaluation,
            seed=seed,
            progress=self.progress and self.rank == 0,
        )
        return RolloutCollector(self.pool, policy, cfg)

    # ------------------------------------------------------------------ training data

    def train_dataloader(self) -> DataLoader:
        module = self.trainer.lightning_module
        policy = module.rollout_policy()
        with module.full_parameters():
            samples, metrics = self.collect_iteration(policy, self.trainer.current_epoch)
        module.rollout_metrics = metrics
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.trainer.current_epoch)
        return DataLoader(
            SampleDataset(samples * self.repeats),
            batch_size=self.batch_size,
            shuffle=True,
            generator=g,
            num_workers=0,  # the rollout data lives in this process; workers would pickle it (and the policy)
            collate_fn=partial(collate, to_observation=partial(policy.to_observation, device="cpu")),
        )

    def collect_iteration(self, policy, epoch: int) -> tuple[list, dict[str, Any]]:
        s = self.sampling
        prompts = self.prompts()
        kept, all_groups, episodes = [], [], []
        dropped = rounds = 0
        steps = env_s = policy_s = policy_calls = 0.0
        start = time.perf_counter()
        for rnd in range(s.max_rounds):
            rounds += 1
            contexts = self.sampler.next(s.contexts_per_round)
            offset = len(all_groups) + dropped
            requests = [
                EpisodeRequest(c.task_id, c.init_state, prompts[c.task_id], seed=self.seed + k, group=offset + i)
                for i, c in enumerate(contexts)
                for k in range(s.group_size)
            ]
            round_seed = hash((self.seed, epoch, rnd, self.rank)) & 0x7FFFFFFF
            results, stats = self.collector(policy, round_seed).collect(requests, desc=f"iteration {epoch} round {rnd}")
            episodes += results
            steps += stats.env_steps
            env_s += stats.env_seconds
            policy_s += stats.policy_seconds
            policy_calls += stats.policy_calls
            groups, n_dropped = group_episodes(results, s.group_size)
            dropped += n_dropped
            for g in groups:
                ctx = contexts[g.group - offset]
                self.sampler.record(ctx, [e.success for e in g.episodes])
            all_groups += groups
            kept += [g for g in groups if g.useful or not s.dynamic_sampling]
            if all_reduce_min(len(kept), self._device()) >= s.groups_per_rank:
                break
        kept = kept[: s.groups_per_rank]
        samples = chunk_samples(kept, robot_action_dim=policy.transforms.action_dim)
        filler = chunk_samples(all_groups[:1], policy.transforms.action_dim)[:1] or [None]
        n = all_reduce_max(len(samples), self._device())
        target = max(1, math.ceil(n / self.batch_size)) * self.batch_size
        if filler[0] is None and not samples:
            raise RuntimeError("no complete rollout group this iteration (all env workers failing?)")
        samples = pad_samples(samples, target, filler[0])
        valid = [e for e in episodes if e.valid]
        adv = np.concatenate([g.advantages for g in kept]) if kept else np.zeros(1)
        metrics = {
            "rollout/success_rate": float(np.mean([e.success for e in valid])) if valid else 0.0,
            "rollout/episodes": float(len(valid)),
            "rollout/episode_len": float(np.mean([e.length for e in valid])) if valid else 0.0,
            "rollout/groups": float(len(all_groups)),
            "rollout/useful_group_frac": sum(g.useful for g in all_groups) / max(len(all_groups), 1),
            "rollout/kept_groups": float(len(kept)),
            "rollout/rounds": float(rounds),
            "rollout/invalid_episodes": float(len(episodes) - len(valid)),
            "rollout/skipped_contexts": float(self.sampler.skipped_total),
            "rollout/adv_abs_mean": float(np.abs(adv).mean()),
            "rollout/adv_pos_frac": float((adv > 0).mean()),
            "rollout/train_chunks": float(sum(x.valid for x in samples)),
            "rollout/env_steps_per_s": steps / max(time.perf_counter() - start, 1e-9),
            "rollout/env_seconds": env_s,
            "rollout/policy_ms_per_call": 1000 * policy_s / max(policy_calls, 1),
            "rollout/seconds": time.perf_counter() - start,
        }
        decoded = [c.record.decoded for e in valid for c in e.chunks if hasattr(c.record, "decoded")]
        if decoded:  # PI0-FAST: chunks whose tokens were not a well-formed action (the env got zeros)
            metrics["rollout/undecodable_frac"] = 1.0 - float(np.mean(decoded))
        self.last_episodes = episodes
        return samples, metrics

    def _device(self) -> torch.device:
        # NCCL collectives need CUDA tensors; gloo takes CPU ones
        if self.trainer is not None and self.trainer.strategy.root_device.type == "cuda":
            return self.trainer.strategy.root_device
        return torch.device("cpu")

    # ------------------------------------------------------------------ validation data

    def eval_requests(self) -> list[EpisodeRequest]:
        """The official evaluation episodes, each task's run from one seeded stream as openpi does (LIBERO)."""
        from pi0_lightning.envs.libero import openpi_streams
        from pi0_lightning.evaluate import eval_requests

        ids = None if self.eval_tasks is None else {int(x) for x in str(self.eval_tasks).split(",")}
        tasks = [t for t in self.spec.tasks if ids is None or t.task_id in ids]
        if self.spec.openpi_seeding and self._streams is None:
            self._streams = openpi_streams(self.pool, [t.task_id for t in tasks], self.eval_episodes, seed=7)
        return eval_requests(tasks, self.eval_episodes, 7, self.video_episodes, self._streams)

    def val_dataloader(self) -> DataLoader:
        requests = self.eval_requests()
        shard = requests[self.rank :: self.world_size]
        per_rank = math.ceil(len(requests) / self.world_size)
        from dataclasses import replace

        shard += [replace(requests[0], pad=True, record_video=False)] * (per_rank - len(shard))
        workers = self.env_config.num_workers
        batches = [shard[i : i + workers] for i in range(0, len(shard), workers)]
        return DataLoader(batches, batch_size=None, collate_fn=_identity, num_workers=0)

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        if isinstance(batch, list):  # validation batches are episode requests for the env workers, not tensors
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Every rank's context sampler (order position, success history); gathered so a resume restores all."""
        local = self.sampler.state_dict() if self.sampler is not None else {}
        states = [local]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * self.world_size
            torch.distributed.all_gather_object(states, local)
        return {"samplers": states, "env": asdict(self.env_config), "sampling": asdict(self.sampling)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sampler_states = state.get("samplers")
        if self.sampler is not None and self._sampler_states and len(self._sampler_states) == self.world_size:
            self.sampler.load_state_dict(self._sampler_states[self.rank])
