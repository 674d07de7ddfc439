"""A scripted LIBERO expert that reads the simulator's privileged state, and the command that turns its episodes
into a LeRobot dataset in openpi's LIBERO layout.

    python -m pi0_lightning.envs.scripted --suite libero_object --tasks 0,1,2 --episodes 50 --out DIR
    python -m pi0_lightning.envs.scripted --suite libero_spatial --episodes 50 --evaluate   # success table only

The expert solves the pick-and-place goals `(On A B)` and `(In A region)`: all of libero_object and
libero_spatial, and six of libero_goal's tasks (bowl, wine bottle and cream cheese placements; not the drawer, whose
compartment must be opened first, nor the plate, which is pushed). It parses the task's BDDL goal, then at every
step reads the object's and the target's poses and the collision geometry of both from MuJoCo and runs a closed
loop through the phases approach, descend, grasp, lift, carry, lower, release and retreat, in the env's own 7-d
action space (OSC_POSE deltas: 5 cm and 0.5 rad per unit, gripper -1 open / +1 closed):

- Grasp: top-down. Compact objects are taken at their centre with the fingers across the footprint's narrow axis
  (principal axes of the collision vertices in the table plane). Objects wider than the open gripper (bowls,
  plates) are taken by the rim on the side nearest the gripper, fingers across the wall.
- Place: the object's centre is carried over the target's centre (the offset between hand and object is measured
  after the lift, so a rim grasp lands centred), lowered until its lowest point is just above the target's top or
  the region's floor, and released.
- A grasp that did not lift the object is retried from the approach, up to `max_regrasps` times.

Deliberate simplifications: no collision-aware path planning (the carry height clears the object, the target and
anything within 12 cm of the straight path); articulated goals (open a drawer, turn on the stove), pushes and the
multi-step libero_10 tasks are not scripted (`UnsupportedTaskError` names the goal).

Each episode runs on a `LiberoEnv` (openpi's reset: the official init state and 10 wait steps) and ends at success or
at the suite's step limit. Demonstrations record what openpi's LIBERO dataset holds: both cameras upright at the
render size, the 8-d state (eef position, axis-angle, gripper) and the executed action, with the task's instruction
as the prompt; only successful episodes are written. Episodes run in parallel `EnvPool` workers (a crashed worker is
replaced and its episode re-run), and are spooled to disk as they arrive, so the dataset never has to fit in memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from pi0_lightning.envs.libero import LiberoEnv, LiberoEnvConfig, resolve_tasks

POS_SCALE = 0.05
"""Metres of end-effector motion per unit of action (robosuite OSC_POSE output_max)."""
ROT_SCALE = 0.5
"""Radians per unit of action."""


class UnsupportedTaskError(ValueError):
    """A task whose goal the expert has no script for (one line naming the goal)."""


@dataclass
class ExpertConfig:
    """Gains, speeds and clearances of the scripted expert."""

    max_speed: float = 1.0
    """Largest translation action (1 = 5 cm per step)."""
    gain: float = 1.5
    """Proportional gain from position error to action."""
    rot_gain: float = 1.0
    """Proportional gain from orientation error to action."""
    reach_tolerance: float = 0.008
    """Metres within which a waypoint counts as reached."""
    approach_height: float = 0.08
    """Height above the grasp point at which the descent starts."""
    grasp_depth: float = 0.025
    """How far below an object's top the fingers close (capped at half its height)."""
    rim_inset: float = 0.012
    """How far inside a wide object's outer edge the fingers close on its rim."""
    grasp_steps: int = 12
    """Steps the gripper closes before lifting."""
    release_steps: int = 10
    """Steps the gripper opens before retreating."""
    clearance: float = 0.04
    """Extra height above everything on the carry path."""
    place_gap: float = 0.012
    """Height of the object's lowest point above the target's top at release."""
    max_regrasps: int = 2
    """Retries after a grasp that did not lift the object."""
    gripper_span: float = 0.075
    """Widest object footprint (narrow axis) taken whole; wider ones are taken by the rim."""
    action_noise: float = 0.0
    """Standard deviation of Gaussian noise added to translation actions (diverse demonstrations)."""


# ---------------------------------------------------------------------------------------------------------------
# geometry from the simulator


def _subtree(model: Any, root: int) -> set[int]:
    bodies = {root}
    for body in range(model.nbody):
        parent = body
        while parent not in bodies and parent != 0:
            parent = model.body_parentid[parent]
        if parent in bodies:
            bodies.add(body)
    return bodies


def collision_points(sim: Any, body_id: int) -> np.ndarray:
    """World-frame points spanning the collision geometry of a body and its descendants: mesh vertices, and the
    corners of primitive geoms' bounding boxes."""
    model, data = sim.model._model, sim.data._data
    bodies = _subtree(model, body_id)
    points = []
    for g in range(model.ngeom):
        if model.geom_bodyid[g] not in bodies or (model.geom_contype[g] == 0 and model.geom_conaffinity[g] == 0):
            continue
        size = model.geom_size[g]
        kind = model.geom_type[g]
        if kind == 7:  # mesh: vertices in the geom frame
            mesh = model.geom_dataid[g]
            start = model.mesh_vertadr[mesh]
            local = model.mesh_vert[start : start + model.mesh_vertnum[mesh]]
        else:
            if kind == 6:  # box
                half = size
            elif kind == 5:  # cylinder
                half = np.array([size[0], size[0], size[1]])
            elif kind == 3:  # capsule
                half = np.array([size[0], size[0], size[0] + size[1]])
            else:  # sphere, ellipsoid, ...
                half = np.array([size[0], size[1] or size[0], size[2] or size[0]])
            signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)])
            local = signs * half
        points.append(data.geom_xpos[g] + local @ data.geom_xmat[g].reshape(3, 3).T)
    if not points:
        return data.xpos[body_id][None].copy()
    return np.concatenate(points)


@dataclass
class Footprint:
    """An object's extent: centre of its points in the table plane, top and bottom heights, and the directions of
    its footprint's long and narrow axes with the widths along them."""

    center: np.ndarray
    top: float
    bottom: float
    narrow_axis: np.ndarray
    narrow_width: float
    long_width: float
    radius: float

    @classmethod
    def of(cls, points: np.ndarray) -> Footprint:
        xy = points[:, :2]
        lo, hi = xy.min(0), xy.max(0)
        center = (lo + hi) / 2
        centred = xy - center
        _, vectors = np.linalg.eigh(centred.T @ centred)
        narrow, wide = vectors[:, 0], vectors[:, 1]
        narrow_proj, wide_proj = centred @ narrow, centred @ wide
        return cls(
            center=center,
            top=float(points[:, 2].max()),
            bottom=float(points[:, 2].min()),
            narrow_axis=narrow,
            narrow_width=float(narrow_proj.max() - narrow_proj.min()),
            long_width=float(wide_proj.max() - wide_proj.min()),
            radius=float(np.linalg.norm(centred, axis=1).max()),
        )


def _axis_angle(rot: np.ndarray) -> np.ndarray:
    """Rotation vector of a rotation matrix."""
    cos = np.clip((np.trace(rot) - 1) / 2, -1.0, 1.0)
    angle = math.acos(cos)
    if angle < 1e-6:
        return np.zeros(3)
    axis = np.array([rot[2, 1] - rot[1, 2], rot[0, 2] - rot[2, 0], rot[1, 0] - rot[0, 1]])
    if angle > math.pi - 1e-3:  # near 180 degrees the antisymmetric part vanishes
        w, v = np.linalg.eigh((rot + rot.T) / 2)
        axis = v[:, np.argmax(w)]
        return axis * angle
    return axis / (2 * math.sin(angle)) * angle


def _down_frame(finger_axis: np.ndarray) -> np.ndarray:
    """Gripper-site orientation pointing straight down with the fingers closing along `finger_axis` (table plane):
    the site's x axis is the finger axis and its z axis points down."""
    x = np.array([finger_axis[0], finger_axis[1], 0.0])
    x /= np.linalg.norm(x)
    z = np.array([0.0, 0.0, -1.0])
    return np.stack([x, np.cross(z, x), z], axis=1)


# ---------------------------------------------------------------------------------------------------------------
# the expert


@dataclass
class _Goal:
    relation: str
    obj: str
    target: str


DRAWER_REGION = re.compile(r"cabinet_\d+_(top|middle|bottom)_region$")
"""LIBERO's names of cabinet drawer compartments: placing there needs the drawer opened first."""


def goal_problem(goal: list) -> str | None:
    """Why the expert cannot do a BDDL goal, or None: one (On object target) or (In object region) predicate whose
    object is not a plate (too flat to lift by its rim: LIBERO pushes plates) and whose target is not a drawer."""
    if not (len(goal) == 1 and len(goal[0]) == 3 and goal[0][0].lower() in ("on", "in")):
        return "the expert scripts only one (On object target) or (In object region) predicate"
    _, obj, target = goal[0]
    if "plate" in obj:
        return "a plate is pushed, not picked"
    if DRAWER_REGION.search(target):
        return "the drawer must be opened first"
    return None


def parse_goal(task_env: Any) -> _Goal:
    """The task's single pick-and-place predicate, or UnsupportedTaskError."""
    goal = task_env.parsed_problem["goal_state"]
    problem = goal_problem(goal)
    if problem is None and goal[0][1] in task_env.objects_dict:
        relation, obj, target = goal[0]
        return _Goal(relation.lower(), obj, target)
    raise UnsupportedTaskError(f"no script for goal {goal}: {problem or 'the object is not a movable object'}")


class PickPlaceExpert:
    """The closed-loop pick-and-place controller for one episode; `act()` gives the next 7-d action."""

    def __init__(self, task_env: Any, config: ExpertConfig | None = None, rng: np.random.Generator | None = None):
        self.env = task_env
        self.config = config or ExpertConfig()
        self.rng = rng or np.random.default_rng(0)
        self.goal = parse_goal(task_env)
        self.sim = task_env.sim
        self.site = task_env.robots[0].eef_site_id
        self.obj_body = task_env.obj_body_id[self.goal.obj]
        self.phase = "approach"
        self.phase_steps = 0
        self.regrasps = 0
        self.hold_offset = np.zeros(2)
        self.hang = 0.0
        self.carry_z = 0.0
        self._plan_grasp()

    # -- state ---------------------------------------------------------------------------------------------------

    @property
    def eef(self) -> np.ndarray:
        return self.sim.data.site_xpos[self.site].copy()

    def _object(self) -> Footprint:
        return Footprint.of(collision_points(self.sim, self.obj_body))

    def _target(self) -> tuple[np.ndarray, float]:
        """Target centre in the table plane and the height to place onto (top surface, or a region's floor)."""
        name = self.goal.target
        if name in self.env.obj_body_id and self.goal.relation == "on":
            footprint = Footprint.of(collision_points(self.sim, self.env.obj_body_id[name]))
            centre = self.sim.data.xpos[self.env.obj_body_id[name]][:2].copy()
            return centre, footprint.top
        region = self.env.object_sites_dict.get(name)
        if region is None:
            raise UnsupportedTaskError(f"no script for target {name!r}")
        pos = self.sim.data.get_site_xpos(name).copy()
        half_height = float(region.size[2]) if len(region.size) > 2 else 0.0
        # "In" a container region: place near its floor; "On" a surface region: onto its plane
        floor = pos[2] - half_height if self.goal.relation == "in" else pos[2]
        return pos[:2], floor

    def _obstacle_top(self, start: np.ndarray, end: np.ndarray) -> float:
        """Highest top of the other objects within 12 cm of the straight carry path."""
        top = 0.0
        for name, body in self.env.obj_body_id.items():
            if body == self.obj_body or name not in self.env.objects_dict and name not in self.env.fixtures_dict:
                continue
            points = collision_points(self.sim, body)
            centre = (points[:, :2].min(0) + points[:, :2].max(0)) / 2
            seg = end - start
            t = np.clip(np.dot(centre - start, seg) / max(np.dot(seg, seg), 1e-9), 0, 1)
            if np.linalg.norm(start + t * seg - centre) < 0.12:
                top = max(top, float(points[:, 2].max()))
        return top

    # -- plan ----------------------------------------------------------------------------------------------------

    def _plan_grasp(self) -> None:
        cfg = self.config
        obj = self._object()
        eef = self.eef
        height = obj.top - obj.bottom
        depth = min(cfg.grasp_depth, height / 2)
        if obj.narrow_width <= cfg.gripper_span:
            self.grasp_xy = obj.center.copy()
            axis = obj.narrow_axis
        else:  # take the rim on the side nearest the gripper, fingers across the wall
            direction = eef[:2] - obj.center
            direction /= max(np.linalg.norm(direction), 1e-9)
            self.grasp_xy = obj.center + direction * (obj.radius - cfg.rim_inset)
            axis = direction
        self.grasp_z = obj.top - depth
        # the fingers are symmetric: of the two headings pick the one nearer the current one
        current = self.sim.data.site_xmat[self.site].reshape(3, 3)[:, 0]
        if np.dot(axis, current[:2]) < 0:
            axis = -axis
        self.finger_axis = axis / np.linalg.norm(axis)

    # -- control -------------------------------------------------------------------------------------------------

    def _move(self, target: np.ndarray, gripper: float, speed: float | None = None) -> np.ndarray:
        cfg = self.config
        delta = (target - self.eef) * cfg.gain / POS_SCALE
        limit = cfg.max_speed if speed is None else speed
        norm = np.linalg.norm(delta)
        if norm > limit:
            delta *= limit / norm
        if cfg.action_noise:
            delta = delta + self.rng.normal(0, cfg.action_noise, 3)
        rot = self.sim.data.site_xmat[self.site].reshape(3, 3)
        error = _axis_angle(_down_frame(self.finger_axis) @ rot.T)
        turn = np.clip(error * cfg.rot_gain / ROT_SCALE, -1, 1)
        return np.concatenate([np.clip(delta, -1, 1), turn, [gripper]])

    def _reached(self, target: np.ndarray, tolerance: float | None = None) -> bool:
        return bool(np.linalg.norm(target - self.eef) < (tolerance or self.config.reach_tolerance))

    def _go(self, phase: str) -> None:
        self.phase, self.phase_steps = phase, 0

    def act(self) -> np.ndarray:
        cfg = self.config
        self.phase_steps += 1
        grasp = np.array([*self.grasp_xy, self.grasp_z])
        above = grasp + [0, 0, cfg.approach_height]
        if self.phase == "approach":
            high = np.array([*self.grasp_xy, max(self.eef[2], above[2])])
            if self._reached(high, 0.015) or (self.phase_steps > 5 and self._reached(above, 0.015)):
                self._go("descend")
            return self._move(high if not self._reached(high[:2].tolist() + [self.eef[2]], 0.02) else above, -1.0)
        if self.phase == "descend":
            if self._reached(grasp) or self.phase_steps > 40:
                self._go("grasp")
            xy_error = np.linalg.norm(grasp[:2] - self.eef[:2])
            waypoint = grasp if xy_error < 0.01 else np.array([*self.grasp_xy, max(grasp[2], self.eef[2] - 0.01)])
            return self._move(waypoint, -1.0, speed=0.6)
        if self.phase == "grasp":
            if self.phase_steps >= cfg.grasp_steps:
                self._obj_z0 = self._object().bottom
                self._go("lift")
            return self._move(grasp, 1.0, speed=0.3)
        if self.phase == "regrasp":
            if self.phase_steps >= cfg.release_steps:
                self._go("approach")
            return self._move(self.eef + [0, 0, 0.02], -1.0)
        if self.phase == "release":
            if self.phase_steps >= cfg.release_steps:
                self._go("retreat")
            return self._move(self.eef, -1.0, speed=0.1)
        if self.phase == "retreat":
            return self._move(self.eef + [0, 0, 0.05], -1.0, speed=0.5)
        # lift, carry and lower steer by the target (it may have moved)
        target_xy, target_top = self._target()
        if self.phase == "lift":
            if self.phase_steps == 1:
                obj = self._object()
                self.hang = self.eef[2] - obj.bottom
                path_top = max(self._obstacle_top(self.eef[:2], target_xy), target_top)
                self.carry_z = max(path_top + self.hang + cfg.clearance, self.eef[2] + 0.05)
            lift = np.array([*self.eef[:2], self.carry_z])
            stayed = self.phase_steps > 8 and self._object().bottom < self._obj_z0 + 0.01
            if stayed and self.regrasps < cfg.max_regrasps:  # the object stayed behind: open and try again
                self.regrasps += 1
                self._plan_grasp()
                self._go("regrasp")
                return self._move(self.eef + [0, 0, 0.03], -1.0)
            if abs(self.eef[2] - self.carry_z) < 0.015:
                obj = self._object()
                self.hold_offset = obj.center - self.eef[:2]
                self._go("carry")
            return self._move(lift, 1.0)
        place_xy = target_xy - self.hold_offset
        if self.phase == "carry":
            goal = np.array([*place_xy, self.carry_z])
            if self._reached(goal, 0.01):
                self._go("lower")
            return self._move(goal, 1.0)
        if self.phase == "lower":
            obj = self._object()
            place_z = self.eef[2] - (obj.bottom - (target_top + cfg.place_gap))
            goal = np.array([*place_xy, place_z])
            if self._reached(goal, 0.01) or self.phase_steps > 60:
                self._go("release")
            return self._move(goal, 1.0, speed=0.5)


# ---------------------------------------------------------------------------------------------------------------
# episodes in env workers


@dataclass
class ExpertEpisode:
    """One scripted episode: its outcome, and (when recorded) what openpi's LIBERO dataset holds per step."""

    task_id: int
    init_state: int
    success: bool
    steps: int
    phase: str
    images: np.ndarray | None = None
    wrist_images: np.ndarray | None = None
    state: np.ndarray | None = None
    actions: np.ndarray | None = None


class ExpertLiberoEnv(LiberoEnv):
    """A LiberoEnv that can run the scripted expert through a whole episode inside its worker process."""

    def demonstrate(
        self,
        task_id: int,
        init_state: int,
        record: bool,
        seed: int,
        rng_state: Any = None,
        expert: ExpertConfig | None = None,
    ) -> ExpertEpisode:
        """Reset to `init_state` (the layout from `rng_state`, openpi's stream, or else from `seed`) and run the expert
        to success or the step limit; `record` renders and keeps every step's frames."""
        from pi0_lightning.policy.transforms import libero_state, rotate_180

        self.set_render(record)
        options = {"task_id": task_id, "init_state": init_state, "rng_state": rng_state}
        obs, _ = self.reset(seed=seed, options=options)
        controller = PickPlaceExpert(self._env.env, expert, np.random.default_rng(seed))
        images, wrist, state, actions = [], [], [], []
        success, steps = False, 0
        while True:
            action = controller.act()
            if record:
                images.append(rotate_180(obs["agentview"]))
                wrist.append(rotate_180(obs["wrist"]))
                state.append(libero_state(obs["eef_pos"], obs["eef_quat"], obs["gripper_qpos"]))
                actions.append(action.astype(np.float32))
            self.set_render(record)
            obs, _, terminated, truncated, _ = self.step(action)
            steps += 1
            if terminated or truncated:
                success = bool(terminated)
                break
        episode = ExpertEpisode(task_id, init_state, success, steps, controller.phase)
        if record:
            episode.images, episode.wrist_images = np.stack(images), np.stack(wrist)
            episode.state, episode.actions = np.stack(state).astype(np.float32), np.stack(actions)
        return episode


def _bddl_goal(task: Any) -> list:
    from libero.libero.envs.bddl_utils import robosuite_parse_problem

    return robosuite_parse_problem(task.bddl_file)["goal_state"]


def check_scriptable(suite: str, task_ids: list[int]) -> None:
    """UnsupportedTaskError for the first task whose BDDL goal the expert cannot do (read without building an env)."""
    for task in resolve_tasks(suite, task_ids):
        goal = _bddl_goal(task)
        problem = goal_problem(goal)
        if problem is not None:
            raise UnsupportedTaskError(f"{suite} task {task.task_id} ({task.name}) has goal {goal}: {problem}")


def scriptable_tasks(suite: str) -> list[int]:
    """Ids of the suite's tasks whose goal the expert has a script for."""
    return [task.task_id for task in resolve_tasks(suite) if goal_problem(_bddl_goal(task)) is None]


@dataclass
class RunPlan:
    """Which episodes to run: per task, `episodes` consecutive init states from `first_init_state`."""

    suite: str
    task_ids: list[int]
    episodes: int
    first_init_state: int = 0
    layout: str = "openpi"
    """openpi: each task's fixture layouts from its seed-7 random stream, as openpi evaluates (episode k sees the
    layout after k resets); seeded: the layout of episode k from seed `seed + k`."""
    seed: int = 0
    context_source: str = "eval"


def run_expert(
    plan: RunPlan,
    num_workers: int = 2,
    record_into: Any = None,
    expert: ExpertConfig | None = None,
    env_config: LiberoEnvConfig | None = None,
    progress: bool = True,
) -> list[ExpertEpisode]:
    """Run the plan's episodes on `num_workers` env workers and return their outcomes (frames dropped).

    With `record_into` (an `EpisodeSpool`), each successful episode is appended to it as a `DemoEpisode` as soon as
    it arrives, so that only one round of episodes is in memory."""
    from tqdm.auto import tqdm

    from pi0_lightning.data.lerobot_writer import DemoEpisode
    from pi0_lightning.envs.libero import init_states, openpi_streams, suite_tasks
    from pi0_lightning.envs.pool import EnvPool, WorkerFailure

    env_config = env_config or LiberoEnvConfig(suite=plan.suite, hard_reset=False, context_source=plan.context_source)
    tasks = suite_tasks(plan.suite)
    jobs = []
    for task in plan.task_ids:
        available = len(init_states(plan.suite, task, plan.context_source))
        for k in range(plan.first_init_state, plan.first_init_state + plan.episodes):
            jobs.append((task, k % available, k))
    record = record_into is not None
    outcomes: list[ExpertEpisode] = []
    with EnvPool(partial(ExpertLiberoEnv, env_config), num_workers=num_workers) as pool:
        streams = {}
        if plan.layout == "openpi":
            last = plan.first_init_state + plan.episodes
            streams = openpi_streams(pool, plan.task_ids, last)
        bar = tqdm(total=len(jobs), desc=f"{plan.suite} expert", unit="ep", disable=not progress, dynamic_ncols=True)
        queue = list(jobs)
        attempts: dict[tuple, int] = {}
        while queue:
            batch, queue = queue[:num_workers], queue[num_workers:]
            args = []
            for task, state, k in batch:
                rng_state = streams[task][k] if streams else None
                args.append((task, state, record, plan.seed + k, rng_state, expert))
            results = pool.call(list(range(len(batch))), "demonstrate", args_list=args)
            for job, result in zip(batch, results, strict=True):
                if isinstance(result, WorkerFailure):  # the worker was replaced: run the episode again
                    attempts[job] = attempts.get(job, 0) + 1
                    if attempts[job] > 2:
                        raise RuntimeError(f"episode {job[:2]} failed three times: {result.reason}")
                    queue.append(job)
                    continue
                if record and result.success:
                    language = tasks[result.task_id].language
                    record_into.append(
                        DemoEpisode(result.images, result.wrist_images, result.state, result.actions, language)
                    )
                result.images = result.wrist_images = result.state = result.actions = None
                outcomes.append(result)
                bar.update(1)
            done = len(outcomes)
            bar.set_postfix(success=f"{sum(o.success for o in outcomes) / max(done, 1):.2f}")
        bar.close()
    return outcomes


def success_table(suite: str, outcomes: list[ExpertEpisode]) -> list[dict[str, Any]]:
    """Per task: episodes, successes, success rate and mean steps of the successful episodes."""
    from pi0_lightning.envs.libero import suite_tasks

    rows = []
    for task in sorted({o.task_id for o in outcomes}):
        mine = [o for o in outcomes if o.task_id == task]
        wins = [o for o in mine if o.success]
        rows.append(
            {
                "task_id": task,
                "task": suite_tasks(suite)[task].language,
                "episodes": len(mine),
                "successes": len(wins),
                "success_rate": len(wins) / len(mine),
                "mean_steps": float(np.mean([o.steps for o in wins])) if wins else None,
            }
        )
    return rows


def format_table(suite: str, rows: list[dict[str, Any]]) -> str:
    lines = [f"| {suite} task | instruction | success | mean steps |", "|---:|---|---:|---:|"]
    for r in rows:
        steps = f"{r['mean_steps']:.0f}" if r["mean_steps"] is not None else "-"
        lines.append(f"| {r['task_id']} | {r['task']} | {r['successes']}/{r['episodes']} | {steps} |")
    total = sum(r["successes"] for r in rows), sum(r["episodes"] for r in rows)
    lines.append(f"| all | | {total[0]}/{total[1]} ({total[0] / max(total[1], 1):.1%}) | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pi0_lightning.envs.scripted", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="libero_object")
    p.add_argument("--tasks", default="all", help="task ids or names, comma-separated; all = every scriptable task")
    p.add_argument("--episodes", type=int, default=50, help="episodes per task (consecutive init states)")
    p.add_argument("--first-init-state", type=int, default=0)
    p.add_argument(
        "--layout",
        choices=("openpi", "seeded"),
        default="openpi",
        help="fixture layouts: openpi's per-task seed-7 stream (evaluation), or seed + episode (extra demonstrations)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the seeded layouts and of the action noise")
    p.add_argument("--context-source", choices=("eval", "all"), default="eval", help="init states to index")
    p.add_argument("--action-noise", type=float, default=0.0, help="Gaussian noise on translation actions")
    p.add_argument("--workers", type=int, default=2, help="env worker processes (~1.8 GB RAM each)")
    p.add_argument("--resolution", type=int, default=256, help="camera render size (openpi's dataset: 256)")
    p.add_argument("--out", help="dataset directory to create (LeRobot, openpi's LIBERO layout)")
    p.add_argument("--evaluate", action="store_true", help="only measure success; write no dataset")
    p.add_argument("--report", help="also write the per-task success table as JSON here")
    p.add_argument("--format", choices=("v3.0", "v2.1"), default="v3.0")
    p.add_argument("--image-storage", choices=("video", "image"), default="video")
    args = p.parse_args(argv)

    from pi0_lightning.data.lerobot_writer import EpisodeSpool, write_lerobot_dataset
    from pi0_lightning.data.source import DatasetError

    try:
        if args.evaluate == bool(args.out):
            raise ValueError("give --out DIR (write demonstrations) or --evaluate (success table only)")
        if args.out and os.path.exists(args.out):
            raise ValueError(f"{args.out} already exists; refusing to overwrite a dataset")
        if min(args.episodes, args.workers) < 1 or min(args.first_init_state, args.action_noise) < 0:
            raise ValueError("--episodes and --workers must be >= 1, --first-init-state and --action-noise >= 0")
        if args.resolution < 16 or args.resolution % 2:
            raise ValueError(f"--resolution must be an even number >= 16, got {args.resolution}")
        if args.tasks == "all":
            task_ids = scriptable_tasks(args.suite)
        else:
            task_ids = [t.task_id for t in resolve_tasks(args.suite, args.tasks)]
            check_scriptable(args.suite, task_ids)
        if args.report:
            Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as e:  # UnknownTaskError and UnsupportedTaskError are ValueErrors
        print(f"scripted: error: {e}", file=sys.stderr)
        return 2
    plan = RunPlan(
        args.suite, task_ids, args.episodes, args.first_init_state, args.layout, args.seed, args.context_source
    )
    expert = ExpertConfig(action_noise=args.action_noise)
    start = time.perf_counter()
    spool = None
    if args.out:
        parent = Path(args.out).absolute().parent
        parent.mkdir(parents=True, exist_ok=True)
        spool = EpisodeSpool(tempfile.mkdtemp(prefix=f".{Path(args.out).name}.episodes-", dir=parent))
    try:
        env_config = LiberoEnvConfig(
            suite=args.suite, resolution=args.resolution, hard_reset=False, context_source=args.context_source
        )
        outcomes = run_expert(plan, args.workers, spool, expert, env_config)
        rows = success_table(args.suite, outcomes)
        print(format_table(args.suite, rows))
        if args.report:
            report = {"plan": asdict(plan), "expert": asdict(expert), "tasks": rows}
            Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
        if spool is not None:
            if not len(spool):
                print("scripted: error: no successful episode to write", file=sys.stderr)
                return 1
            root = write_lerobot_dataset(args.out, spool, fps=10, version=args.format, image_storage=args.image_storage)
            print(f"wrote {root}: {len(spool)} demonstrations")
    except DatasetError as e:
        print(f"scripted: error: {e}", file=sys.stderr)
        return 2
    finally:
        if spool is not None:
            spool.close()
    print(f"{len(outcomes)} episodes in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    # through the package module, so that what workers unpickle (the env class, its configs) is importable by name
    from pi0_lightning.envs.scripted import main as package_main

    sys.exit(package_main())
