"""Which environment an experiment runs: one config dataclass, one function that builds everything the rollout side
needs (a picklable env factory for the workers, the tasks with their instructions, step limits, init-state counts,
and fallback norm stats for randomly initialised models).

The spec is built before the model exists (the model's setup reads its tasks and norm stats), so it does not know the
model's input image size; `EnvSpec.env_factory(image_size)` gives the factory for a given policy: LIBERO envs that
return their camera images upright and resized to that size (`LiberoEnvConfig.image_size`), so that neither the
worker pipes nor the main process handle full-size renders. The data module asks for it when it starts the workers,
with the policy's size. The reach env has no such option and returns its images as rendered (its factory ignores the
size; the policy prepares them).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal

from pi0_lightning.envs.libero import (
    SUITE_MAX_STEPS,
    LiberoEnv,
    LiberoEnvConfig,
    TaskInfo,
    init_states,
    resolve_tasks,
)
from pi0_lightning.envs.physics import check_mujoco


@dataclass
class EnvConfig:
    name: Literal["libero", "reach"] = "libero"
    """libero: the real benchmark; reach: the 2-D toy task used to prove learning on CPU."""
    suite: str = "libero_spatial"
    """LIBERO suite (ignored for reach)."""
    tasks: str = "all"
    """Task ids or names, comma-separated, or 'all'."""
    num_workers: int = 2
    """Environment subprocesses per rank (LIBERO: ~1.8 GB RAM each)."""
    max_steps: int | None = None
    """Policy steps per episode; None = the suite's openpi limit (reach: its config's)."""
    num_steps_wait: int = 10
    """LIBERO dummy steps at the start of each episode."""
    context_source: Literal["eval", "all"] = "eval"
    """LIBERO initial states used as training contexts: the 50 official ones, or all shipped ones (100 per task for
    libero_spatial/_10/_90; libero_object and libero_goal ship only the 50)."""
    allow_unverified_physics: bool = False
    """LIBERO: run under a MuJoCo outside the verified range (numbers then differ from published ones)."""
    wrist_collision: bool = True
    """LIBERO: the Panda with robosuite 1.4.1's wrist collision geom (openpi's stack); False = robosuite 1.4.0's."""
    hard_reset: bool = True
    """LIBERO: rebuild the MuJoCo model at each validation episode's reset (LIBERO's default, openpi's evaluation)."""
    train_hard_reset: bool = False
    """LIBERO: rebuild it for training rollouts too. False: soft resets (~0.15 s instead of ~2.3 s), cleared of what
    the previous episode leaves behind (`envs.libero`; `python -m pi0_lightning.envs.reset_check` compares them)."""
    resolution: int = 256
    """LIBERO: camera render size (openpi: 256, resized to the model's input size, by the env workers when the data
    module knows the policy: `EnvSpec.env_factory`). Smaller renders are faster on CPU, but their pixels are not
    openpi's."""
    worker_timeout: float = 300.0
    """Seconds before a hung env worker is replaced."""
    start_method: str = "forkserver"
    """multiprocessing start method for env workers."""
    reach_goal_only: bool = False
    """reach: draw only the current task's target (the goal is then visible as well as named)."""


@dataclass
class EnvSpec:
    factory: Any
    tasks: list[TaskInfo]
    max_steps: int
    init_states_per_task: int
    default_norm_stats: dict
    delta_actions: bool
    openpi_seeding: bool = False
    """Evaluation runs each task's episodes from one seeded random stream (LIBERO's fixture layouts)."""
    libero: LiberoEnvConfig | None = None
    """The LIBERO envs' config (None: another env), from which `env_factory` makes envs that prepare images."""

    def env_factory(self, image_size: int | None) -> Any:
        """The env factory for a policy whose model takes `image_size` x `image_size` images: LIBERO envs that return
        them upright at that size, marked "images_prepared" (`LiberoEnvConfig.image_size`); `factory` (images as
        rendered) for None or an env that cannot prepare them (reach)."""
        if image_size is None or self.libero is None:
            return self.factory
        return partial(LiberoEnv, replace(self.libero, image_size=image_size))

    def prepares_images(self, image_size: int | None) -> bool:
        """Whether `env_factory(image_size)`'s envs return prepared images (upright, at `image_size`)."""
        return image_size is not None and self.libero is not None


def identity_norm_stats(state_dim: int = 8, action_dim: int = 7) -> dict:
    """Stats that leave values unchanged: only for randomly initialised demo models (real checkpoints carry theirs)."""

    def stats(d: int) -> dict[str, list[float]]:
        return {"mean": [0.0] * d, "std": [1.0] * d, "q01": [-1.0] * d, "q99": [1.0] * d}

    return {"norm_stats": {"state": stats(state_dim), "actions": stats(action_dim)}}


def build_env_spec(cfg: EnvConfig) -> EnvSpec:
    if cfg.name == "libero":
        env_cfg = LiberoEnvConfig(
            suite=cfg.suite,
            max_steps=cfg.max_steps,
            num_steps_wait=cfg.num_steps_wait,
            hard_reset=cfg.hard_reset,
            resolution=cfg.resolution,
            context_source=cfg.context_source,
            allow_unverified_physics=cfg.allow_unverified_physics,
            wrist_collision=cfg.wrist_collision,
        )
        check_mujoco(cfg.allow_unverified_physics)
        tasks = resolve_tasks(cfg.suite, cfg.tasks)
        per_task = min(len(init_states(cfg.suite, t.task_id, cfg.context_source)) for t in tasks)
        return EnvSpec(
            partial(LiberoEnv, env_cfg),
            tasks,
            env_cfg.episode_steps if cfg.max_steps is None else cfg.max_steps,
            per_task,
            identity_norm_stats(),
            delta_actions=True,
            openpi_seeding=True,
            libero=env_cfg,
        )
    if cfg.name == "reach":
        from pi0_lightning.envs.reach import ReachEnv, ReachEnvConfig, reach_norm_stats, reach_tasks

        reach_cfg = ReachEnvConfig(draw_all_targets=not cfg.reach_goal_only)
        if cfg.max_steps is not None:
            reach_cfg = ReachEnvConfig(max_steps=cfg.max_steps, draw_all_targets=not cfg.reach_goal_only)
        all_tasks = reach_tasks(reach_cfg)
        if cfg.tasks == "all":
            tasks = list(all_tasks)
        else:
            ids = [int(x) for x in cfg.tasks.split(",")]
            bad = [i for i in ids if not 0 <= i < len(all_tasks)]
            if bad:
                valid = "; ".join(f"{t.task_id}: {t.language}" for t in all_tasks)
                raise ValueError(f"unknown reach task(s) {bad}; valid tasks: {valid}")
            tasks = [all_tasks[i] for i in ids]
        return EnvSpec(
            partial(ReachEnv, reach_cfg),
            tasks,
            reach_cfg.max_steps,
            reach_cfg.num_init_states,
            reach_norm_stats(reach_cfg),
            delta_actions=False,
        )
    raise ValueError(
        f"unknown env {cfg.name!r}; choose 'libero' or 'reach' (LIBERO suites: {', '.join(SUITE_MAX_STEPS)})"
    )
