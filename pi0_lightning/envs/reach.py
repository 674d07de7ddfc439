"""A 2-D reaching task with LIBERO's env protocol: the learning proof for RL post-training on CPU.

Why it exists
-------------
Real LIBERO is far too slow on CPU for a quick RL experiment (seconds per reset, ~100 ms per rendered step), and a
randomly initialised tiny PI0 never succeeds there, so RL has no signal to learn from. This task keeps
:class:`~pi0_lightning.envs.libero.LiberoEnv`'s protocol and observation format exactly (so the same
:class:`~pi0_lightning.policy.pi0_libero.LiberoPolicy`, rollout collector, :class:`~pi0_lightning.envs.pool.EnvPool`
and evaluation code run unchanged) but costs microseconds per step, and a random policy succeeds in a fair share
of the episodes by chance (a quarter, see below). RL should raise that to ~100% within minutes.

The task
--------
The arena is the square [-1, 1]^2. Four coloured targets sit at fixed positions, red (-0.5, 0.5), green (0.5, 0.5),
blue (-0.5, -0.5) and yellow (0.5, -0.5), each a disc of radius `goal_radius`; the agent is a white dot. Task `i`
is the instruction ``TASKS[i]`` ("reach the red target", ...): the episode succeeds (reward 1, terminated) as soon
as the agent's centre is within `goal_radius` of that target's centre. The other targets are distractors. Each
task has `num_init_states` seeded start positions, uniform in the disc of radius 0.3 around the centre (no start
is inside any target), chosen by ``reset(options={"task_id": i, "init_state": k})``.

Actions are 7-dim like LIBERO's; dims 0 and 1 are (dx, dy), each clipped to [-1, 1] and multiplied by `step_scale`;
the position is clipped to the arena. The other dims are ignored. Observations, as LiberoEnv's:
``eef_pos`` (x, y, 0), ``eef_quat`` the identity [0, 0, 0, 1] (xyzw), ``gripper_qpos`` zeros(2), all float64, and
``agentview`` / ``wrist`` uint8 (S, S, 3) images only when rendering was requested (``set_render``; the default
renders). ``wrist`` is a 2x zoom centred on the agent (black outside the arena), or all zeros with
``render_wrist=False``.

Image orientation: LIBERO's raw renders are upside down and the policy transforms rotate them by 180 degrees
(``img[::-1, ::-1]``). The raw images here follow the same convention: ``img[::-1, ::-1]`` is the upright view,
with +y up and +x to the right (red target top-left). Rendering is numpy only and deterministic: filled discs,
a pixel takes a disc's colour when its centre is inside it.

Calibration (measured with `tests/envs/test_reach.py`'s `simulate_success_rate` over the env's own init states,
default config: ``step_scale=0.25``, ``goal_radius=0.3``, ``max_steps=20``; 4000 episodes per run, tasks and init
states drawn uniformly, two seeds):

* i.i.d. random actions, (dx, dy) ~ N(0, 0.5^2) per step (a z-scored model action ~ N(0, 1) unnormalised with
  :func:`reach_norm_stats`): 23.9% and 23.9% success (per task 21.7-26.0%); 500-episode runs with seeds 0-4 give
  23.0-26.6%.
* the same, but each random action held for 5 steps (a chunk of identical actions): 26.4% and 25.7%.
* straight to the target (:func:`expert_action`): 100% on all 4 x 50 init states, in 1 or 2 steps.

Cost: a step or reset takes ~5 us without rendering and ~0.16 ms with both 64x64 images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pi0_lightning.envs.libero import TaskInfo, UnknownTaskError

try:
    import gymnasium as gym
except ImportError:  # pragma: no cover - gymnasium is a core dependency; the env itself does not need it
    gym = None

SUITE = "reach"
COLORS = ("red", "green", "blue", "yellow")
TASKS = tuple(f"reach the {c} target" for c in COLORS)
"""The language instruction of each task id."""
TARGET_POSITIONS = np.array([[-0.5, 0.5], [0.5, 0.5], [-0.5, -0.5], [0.5, -0.5]])
"""(x, y) of the red, green, blue and yellow targets (task ids 0..3)."""
TARGET_RGB = np.array([[220, 40, 40], [40, 190, 60], [50, 90, 230], [230, 200, 40]], dtype=np.uint8)
AGENT_RGB = np.array([255, 255, 255], dtype=np.uint8)
FLOOR_RGB = np.array([70, 70, 70], dtype=np.uint8)
ARENA = 1.0
"""Half-width of the square arena; positions are clipped to [-ARENA, ARENA]."""
START_RADIUS = 0.3
"""Start positions are uniform in the disc of this radius around the centre."""
AGENT_RADIUS = 0.08
"""Drawn radius of the agent dot (world units; ~2.5 px at 64x64 in the agent view)."""
WRIST_HALF_WIDTH = 0.5
"""Half-width (world units) of the wrist view's window around the agent: a 2x zoom."""
_MIN_TARGET_DISTANCE = float(np.linalg.norm(TARGET_POSITIONS[0])) - START_RADIUS  # closest a start gets to a target


@dataclass
class ReachEnvConfig:
    """Reach task settings; the defaults are calibrated (see the module docstring)."""

    image_size: int = 64
    """Side of the square RGB renders (the policy resizes them to 224)."""
    max_steps: int = 20
    """Steps per episode (truncation)."""
    goal_radius: float = 0.3
    """Success distance from the target's centre (also the drawn target radius)."""
    step_scale: float = 0.25
    """How far one action unit moves the agent per step (world units; the arena is [-1, 1]^2)."""
    num_tasks: int = 4
    """Tasks in use: the first `num_tasks` of TASKS (all four targets are always drawn)."""
    num_init_states: int = 50
    """Seeded start positions per task."""
    seed: int = 7
    """Seed of the start positions (task `i` uses ``default_rng([seed, i])``)."""
    render_wrist: bool = True
    """Render the wrist image as a 2x zoom around the agent; False returns an all-zero wrist image (cheaper)."""
    draw_all_targets: bool = True
    """Draw all four targets (the goal is named only in language) or only the current task's target (the goal is
    visible too, which a tiny randomly initialised model picks up much faster)."""

    def __post_init__(self) -> None:
        if not 1 <= self.num_tasks <= len(TASKS):
            raise ValueError(f"num_tasks must be in 1..{len(TASKS)}, got {self.num_tasks}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {self.image_size}")
        if self.max_steps < 1 or self.num_init_states < 1:
            raise ValueError(
                f"max_steps and num_init_states must be >= 1, got {self.max_steps}, {self.num_init_states}"
            )
        if not self.step_scale > 0:
            raise ValueError(f"step_scale must be positive, got {self.step_scale}")
        if not 0 < self.goal_radius < _MIN_TARGET_DISTANCE:
            raise ValueError(
                f"goal_radius must be in (0, {_MIN_TARGET_DISTANCE:.3f}) so that no start is inside a target, "
                f"got {self.goal_radius}"
            )


def _valid_tasks(num_tasks: int) -> str:
    return "; ".join(f"{i}: {TASKS[i]}" for i in range(num_tasks))


def _check_task(task_id: Any, num_tasks: int = len(TASKS)) -> int:
    if isinstance(task_id, bool) or not isinstance(task_id, int | np.integer) or not 0 <= task_id < num_tasks:
        raise UnknownTaskError(f"unknown reach task {task_id!r}; valid tasks: {_valid_tasks(num_tasks)}")
    return int(task_id)


def task_language(task_id: int) -> str:
    """The instruction of a task id (ValueError listing the valid tasks if unknown)."""
    return TASKS[_check_task(task_id)]


def reach_tasks(config: ReachEnvConfig | None = None) -> tuple[TaskInfo, ...]:
    """The tasks as LIBERO :class:`TaskInfo` records (suite "reach", no bddl file), for evaluation code."""
    config = config or ReachEnvConfig()
    return tuple(
        TaskInfo(SUITE, i, TASKS[i].replace(" ", "_"), TASKS[i], "", config.num_init_states)
        for i in range(config.num_tasks)
    )


def reach_init_states(config: ReachEnvConfig, task_id: int) -> np.ndarray:
    """(num_init_states, 2) deterministic start positions of a task, uniform in the disc of radius START_RADIUS."""
    _check_task(task_id, config.num_tasks)
    rng = np.random.default_rng([config.seed, task_id])
    n = config.num_init_states
    r = START_RADIUS * np.sqrt(rng.uniform(0.0, 1.0, n))
    theta = rng.uniform(0.0, 2.0 * math.pi, n)
    return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)


def expert_action(eef_pos: np.ndarray, task_id: int, config: ReachEnvConfig | None = None) -> np.ndarray:
    """The straight-to-target action (7,): the remaining offset in action units, clipped to [-1, 1] per axis."""
    config = config or ReachEnvConfig()
    delta = (TARGET_POSITIONS[_check_task(task_id)] - np.asarray(eef_pos, dtype=np.float64)[:2]) / config.step_scale
    action = np.zeros(7)
    action[:2] = np.clip(delta, -1.0, 1.0)
    return action


def reach_norm_stats(config: ReachEnvConfig | None = None) -> dict:
    """openpi ``norm_stats.json`` content for this task, chosen analytically (the config does not change them).

    Actions (7 dims): mean 0, std 0.5, q01 -1, q99 1. Z-score: a model action ~ N(0, 1) becomes an env action
    ~ N(0, 0.5^2) (the calibrated random policy) and +-2 becomes the clip limit +-1; quantile: [-1, 1] maps to the
    env's [-1, 1]. State (8 dims: x, y, z, axis-angle (3), gripper (2)): mean 0, std 1, q01 -1, q99 1, so the
    arena [-1, 1] normalises to [-1, 1] in both modes and the constant-zero dims to 0.
    """
    del config

    def stats(dim: int, std: float) -> dict[str, list[float]]:
        return {"mean": [0.0] * dim, "std": [std] * dim, "q01": [-1.0] * dim, "q99": [1.0] * dim}

    return {"norm_stats": {"state": stats(8, ARENA), "actions": stats(7, 0.5)}}


def _pixel_centres(size: int, half_width: float) -> np.ndarray:
    """World offsets of the pixel centres along one axis of an upright view of half-width `half_width`."""
    return (np.arange(size) + 0.5) * (2.0 * half_width / size) - half_width


class ReachEnv(gym.Env if gym is not None else object):
    """The reach task with LiberoEnv's protocol; see the module docstring.

    reset(options={"task_id": i, "init_state": k}) returns the first observation; `seed` is accepted and unused
    (the env is deterministic). terminated = success; truncated = `max_steps` steps reached without success.
    """

    metadata = {"render_modes": []}

    def __init__(self, config: ReachEnvConfig | None = None, **kwargs: Any):
        self.config = config or ReachEnvConfig(**kwargs)
        s = self.config.image_size
        if gym is not None:
            self.observation_space = gym.spaces.Dict(
                {
                    "agentview": gym.spaces.Box(0, 255, (s, s, 3), np.uint8),
                    "wrist": gym.spaces.Box(0, 255, (s, s, 3), np.uint8),
                    "eef_pos": gym.spaces.Box(-ARENA, ARENA, (3,), np.float64),
                    "eef_quat": gym.spaces.Box(-1, 1, (4,), np.float64),
                    "gripper_qpos": gym.spaces.Box(-np.inf, np.inf, (2,), np.float64),
                }
            )
            self.action_space = gym.spaces.Box(-1, 1, (7,), np.float64)
        self._init_states = [reach_init_states(self.config, i) for i in range(self.config.num_tasks)]
        self._task_id: int | None = None
        self._pos = np.zeros(2)
        self._steps = 0
        self._render_next = True
        # upright-view pixel centres: columns go +x to the right, rows go +y upwards (row 0 is the top)
        self._xs = _pixel_centres(s, ARENA)
        self._ys = -_pixel_centres(s, ARENA)
        self._wrist_dx = _pixel_centres(s, WRIST_HALF_WIDTH)
        self._wrist_dy = -_pixel_centres(s, WRIST_HALF_WIDTH)
        self._backgrounds: dict[int, np.ndarray] = {}  # per task: the static agent view (floor + targets), upright

    # -------------------------------------------------------------- rendering

    def _paint(self, xs: np.ndarray, ys: np.ndarray, agent: np.ndarray | None) -> np.ndarray:
        """Upright image whose pixel centres are at world (xs[col], ys[row]); the agent is drawn if given."""
        img = np.zeros((len(ys), len(xs), 3), dtype=np.uint8)
        inside = (np.abs(ys) <= ARENA)[:, None] & (np.abs(xs) <= ARENA)[None, :]
        img[inside] = FLOOR_RGB
        r2 = self.config.goal_radius**2
        for i, ((tx, ty), rgb) in enumerate(zip(TARGET_POSITIONS, TARGET_RGB, strict=True)):
            if self.config.draw_all_targets or i == self._task_id:
                img[((ys[:, None] - ty) ** 2 + (xs[None, :] - tx) ** 2) <= r2] = rgb
        if agent is not None:
            self._paint_agent(img, xs, ys, agent)
        return img

    @staticmethod
    def _paint_agent(img: np.ndarray, xs: np.ndarray, ys: np.ndarray, agent: np.ndarray) -> None:
        img[((ys[:, None] - agent[1]) ** 2 + (xs[None, :] - agent[0]) ** 2) <= AGENT_RADIUS**2] = AGENT_RGB

    def _images(self) -> dict[str, np.ndarray]:
        if self._task_id not in self._backgrounds:
            self._backgrounds[self._task_id] = self._paint(self._xs, self._ys, None)
        agent = self._backgrounds[self._task_id].copy()
        self._paint_agent(agent, self._xs, self._ys, self._pos)
        if self.config.render_wrist:
            wrist = self._paint(self._pos[0] + self._wrist_dx, self._pos[1] + self._wrist_dy, self._pos)
        else:
            wrist = np.zeros_like(agent)
        # raw renders are upside down like LIBERO's: the policy's img[::-1, ::-1] gives back the upright view
        return {
            "agentview": np.ascontiguousarray(agent[::-1, ::-1]),
            "wrist": np.ascontiguousarray(wrist[::-1, ::-1]),
        }

    def _observe(self) -> dict[str, np.ndarray]:
        obs = {
            "eef_pos": np.array([self._pos[0], self._pos[1], 0.0]),
            "eef_quat": np.array([0.0, 0.0, 0.0, 1.0]),
            "gripper_qpos": np.zeros(2),
        }
        if self._render_next:
            obs.update(self._images())
        self._render_next = True
        return obs

    def _success(self) -> bool:
        target = TARGET_POSITIONS[self._task_id]
        d2 = (self._pos[0] - target[0]) ** 2 + (self._pos[1] - target[1]) ** 2
        return bool(d2 <= self.config.goal_radius**2)

    # -------------------------------------------------------------- gymnasium API

    @property
    def task_id(self) -> int | None:
        return self._task_id

    @property
    def language(self) -> str | None:
        """The current task's instruction (None before the first reset)."""
        return None if self._task_id is None else TASKS[self._task_id]

    def set_render(self, render: bool) -> None:
        """Whether the next `step`/`reset` returns the camera images."""
        self._render_next = bool(render)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        options = options or {}
        task_id = options.get("task_id", self._task_id if self._task_id is not None else 0)
        task_id = _check_task(task_id, self.config.num_tasks)
        k = int(options.get("init_state", 0))
        starts = self._init_states[task_id]
        if not 0 <= k < len(starts):
            raise ValueError(f"init_state {k} out of range 0..{len(starts) - 1}")
        self._task_id = task_id
        self._pos = starts[k].copy()
        self._steps = 0
        return self._observe(), {"task_id": task_id, "init_state": k}

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        if self._task_id is None:
            raise RuntimeError("call reset() before step()")
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape[0] < 2 or not np.isfinite(a[:2]).all():
            raise ValueError(f"action needs finite dims 0 and 1 (dx, dy), got {a[:7]}")
        self._pos = np.clip(self._pos + np.clip(a[:2], -1.0, 1.0) * self.config.step_scale, -ARENA, ARENA)
        self._steps += 1
        success = self._success()
        truncated = not success and self._steps >= self.config.max_steps
        return self._observe(), float(success), success, truncated, {"success": success, "steps": self._steps}

    def close(self) -> None:
        pass
