"""RolloutDataModule: one epoch = one RL iteration (`rl/iteration.py`), run in `train_dataloader()`.

`setup()` builds the env spec (tasks, limits), which the module's setup reads to build the model's assets. This
rank's env worker pool starts at its first use (the model never enters a worker), when the policy exists: LIBERO
workers then return camera images upright and resized to the policy's input size (`EnvSpec.env_factory`), so the
main process neither receives full-size renders nor rotates and resizes them; `env_image_size` records that size for
the video writer.

Every epoch Lightning reloads the train loader (`reload_dataloaders_every_n_epochs=1`, set by the CLI), which runs
the iteration with the module's current policy (FSDP parameters gathered for it) and serves its samples. Validation
shards the official evaluation episodes across ranks (padded with masked filler episodes); loading a batch runs its
episodes once per evaluation setting, and `PI0RLModule.validation_step` counts them. LIBERO evaluation follows
openpi's seeding (`envs.libero.openpi_streams`); training rollouts seed each episode's reset.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, replace
from functools import partial
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from pi0_lightning.data.samples import SampleDataset, collate
from pi0_lightning.envs.pool import EnvPool
from pi0_lightning.envs.spec import EnvConfig, EnvSpec, build_env_spec
from pi0_lightning.lit.strategies import full_parameters
from pi0_lightning.rl.iteration import Iteration, run_iteration
from pi0_lightning.rl.sampling import Context, ContextSampler, SamplingConfig
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
        pipeline_groups: int = 2,
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
            pipeline_groups: env worker groups of pipelined collection (`rollout.collector`): while the policy
                computes one group's chunks the others step theirs. 1 = lockstep waves; distributed runs always
                collect in lockstep, which keeps the ranks' forward calls equal.
        """
        super().__init__()
        self.pipeline_groups = pipeline_groups
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
        self.env_image_size: int | None = None
        """The size at which this rank's env workers return camera images upright and resized (the policy's input
        size; None: as rendered, e.g. the reach env, or no workers yet). Rollout videos read it (`write_videos`)."""
        self.sampler: ContextSampler | None = None
        self._sampler_states: list[dict] | None = None
        self._streams: dict[int, list] | None = None
        self.iteration: Iteration | None = None
        """The last RL iteration's samples, metrics and episodes (read by the module and the callbacks)."""

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

    def env_pool(self, policy=None) -> EnvPool:
        """This rank's env workers for `policy` (default: the module's), started at the first call: their envs return
        camera images prepared at the policy's input size where the env can (`EnvSpec.env_factory`). A policy with
        another input size gets fresh workers."""
        if policy is None:
            policy = self.trainer.lightning_module.policy()
        size = getattr(getattr(policy, "transforms", None), "image_size", None)
        size = size if self.spec.prepares_images(size) else None
        if self.pool is not None and not self.pool.closed and size == self.env_image_size:
            return self.pool
        if self.pool is not None:
            self.pool.close()
        env_vars = {"MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"), "OMP_NUM_THREADS": "1"}
        self.pool = EnvPool(
            self.spec.env_factory(size),
            self.env_config.num_workers,
            timeout_s=self.env_config.worker_timeout,
            start_method=self.env_config.start_method,
            env_vars=env_vars,
        )
        self.env_image_size = size
        return self.pool

    def teardown(self, stage: str) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def prompts(self) -> dict[int, str]:
        return {t.task_id: t.language for t in self.spec.tasks}

    # ------------------------------------------------------------------ training data: one RL iteration

    def train_dataloader(self) -> DataLoader:
        """Runs this epoch's RL iteration (`rl/iteration.py`) with the module's current policy and serves its
        samples; the iteration's metrics and episodes stay in `self.iteration` for logging."""
        module = self.trainer.lightning_module
        policy = module.policy()
        epoch = self.trainer.current_epoch
        with full_parameters(self.trainer):
            self.iteration = run_iteration(
                partial(self._collect, policy),
                self.sampler,
                self.sampling,
                self.prompts(),
                iteration=epoch,
                seed=self.seed,
                rank=self.rank,
                batch_size=self.batch_size,
                robot_action_dim=policy.transforms.action_dim,
                device=self._device(),
            )
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return DataLoader(
            SampleDataset(self.iteration.samples * self.repeats),
            batch_size=self.batch_size,
            shuffle=True,
            generator=g,
            num_workers=0,  # the rollout data lives in this process; workers would pickle it (and the policy)
            collate_fn=partial(collate, to_observation=partial(policy.to_observation, device="cpu")),
        )

    def _collect(self, policy, requests, seed: int, desc: str, evaluation: bool = False):
        cfg = CollectorConfig(
            replan_steps=self.replan_steps,
            max_steps=self.spec.max_steps,
            sync_horizon=self.world_size > 1,
            pipeline_groups=1 if self.world_size > 1 else self.pipeline_groups,
            retry_env_errors=not evaluation,
            seed=seed,
            progress=self.progress and self.rank == 0,
        )
        if self.env_config.name == "libero":  # validation resets as configured, training rollouts by train_hard_reset
            hard = self.env_config.hard_reset if evaluation else self.env_config.train_hard_reset
            requests = [replace(r, hard_reset=hard) for r in requests]
        return RolloutCollector(self.env_pool(policy), policy, cfg).collect(requests, desc=desc)

    def _device(self) -> torch.device:
        # NCCL collectives need CUDA tensors; gloo takes CPU ones
        if self.trainer is not None and self.trainer.strategy.root_device.type == "cuda":
            return self.trainer.strategy.root_device
        return torch.device("cpu")

    # ------------------------------------------------------------------ validation data: evaluation episodes

    def eval_requests(self) -> list[EpisodeRequest]:
        """The official evaluation episodes, each task's run from one seeded stream as openpi does (LIBERO)."""
        from pi0_lightning.envs.libero import openpi_streams
        from pi0_lightning.evaluate import eval_requests

        ids = None if self.eval_tasks is None else {int(x) for x in str(self.eval_tasks).split(",")}
        tasks = [t for t in self.spec.tasks if ids is None or t.task_id in ids]
        if self.spec.openpi_seeding and self._streams is None:
            self._streams = openpi_streams(self.env_pool(), [t.task_id for t in tasks], self.eval_episodes, seed=7)
        return eval_requests(tasks, self.eval_episodes, 7, self.video_episodes, self._streams)

    def val_dataloader(self) -> DataLoader:
        """Batches of this rank's evaluation episodes (padded with masked fillers so ranks stay in step), run when
        the batch is loaded: each batch is a list with the finished episodes per evaluation setting."""
        requests = self.eval_requests()
        shard = requests[self.rank :: self.world_size]
        per_rank = math.ceil(len(requests) / self.world_size)
        shard += [replace(requests[0], pad=True, record_video=False)] * (per_rank - len(shard))
        workers = self.env_config.num_workers
        batches = [shard[i : i + workers] for i in range(0, len(shard), workers)]
        return DataLoader(batches, batch_size=None, collate_fn=self._evaluate, num_workers=0)

    def _evaluate(self, requests: list[EpisodeRequest]) -> list[list]:
        module = self.trainer.lightning_module
        algorithm, out = module.algorithm, []
        with full_parameters(self.trainer):
            for i, (_, value) in enumerate(algorithm.eval_settings()):
                seed = hash((self.seed, 1_000_003, requests[0].task_id, requests[0].init_state, i)) & 0x7FFFFFFF
                label = f"eval {algorithm.setting_name}={value:g}"
                results, _ = self._collect(module.policy(value), requests, seed, label, evaluation=True)
                out.append(results)
        return out

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
