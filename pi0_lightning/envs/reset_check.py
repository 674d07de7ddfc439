"""Whether a soft reset (`hard_reset=False`) gives the same episode as a hard reset, bit for bit.

    python -m pi0_lightning.envs.reset_check --suites libero_spatial,libero_object,libero_goal,libero_10 \\
        [--tasks all] [--init-states 50] [--steps 20] [--out report.json]

For each task and each of its first `--init-states` official init states k, two `LiberoEnv`s play the same episode:
- A resets hard (the MuJoCo model and the robot's Python objects are rebuilt at every reset: the official path);
- B resets soft, and before each of its resets it has played another episode: the previous init state's compared
  episode (or, for the task's first, the wait steps from another init state), followed by `DIRTY_STEPS` random
  actions that close the gripper, so that whatever a soft reset leaves over (gripper command, controller, warm start,
  observable phases, model fields) is non-trivial.
Both reset with openpi's episode-k layout (the same `rng_state` from `reset_streams`), then take the same actions:
the wait steps of `LiberoEnv.reset` and `--steps` pseudo-random actions seeded by k.

Compared after `set_init_state` (step 0), after every wait step (1..wait) and every policy step, as raw bytes: the
model's body poses (`body_pos`, `body_quat`: the sampled fixture poses) and `site_rgba` (LIBERO's site visibility
toggles), `sim.data` `time`, `qpos`, `qvel`, `act`, `ctrl` (the torques and gripper command actually applied),
`qacc_warmstart`, and the robot observation (`eef_pos`, `eef_quat`, `gripper_qpos`, as the env returns them); the
camera images (agentview, wrist) at `--resolution` on the last step only (rendering is the expensive part). A pair is
identical when every quantity matches bit for bit at every step; otherwise the report gives the first differing
quantity (the first step at which anything differs, quantities in the order above), that step, and the quantity's
largest absolute difference over the episode, plus the same for every differing quantity.

`--raw-soft-reset` checks robosuite 1.4.0's soft reset as is (`LiberoEnvConfig.clear_soft_reset_leftovers=False`),
without what `LiberoEnv` clears on a soft reset. Prints a per-suite table, `--out` writes the JSON report. Exit 0
whatever the finding; 2 on bad input (unknown suite or task, non-positive counts).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

DIRTY_STEPS = 5
"""Random actions with a closing gripper command that B plays after each episode, before its next soft reset."""
ACTION_SCALE = 0.5
"""Arm actions are uniform in +-ACTION_SCALE (OSC deltas); the gripper command is +-1."""
MODEL_FIELDS = ("body_pos", "body_quat", "site_rgba")
DATA_FIELDS = ("time", "qpos", "qvel", "act", "ctrl", "qacc_warmstart")
ROBOT_FIELDS = (("eef_pos", "robot0_eef_pos"), ("eef_quat", "robot0_eef_quat"), ("gripper_qpos", "robot0_gripper_qpos"))
IMAGE_FIELDS = (("agentview", "agentview_image"), ("wrist", "robot0_eye_in_hand_image"))
QUANTITIES = MODEL_FIELDS + DATA_FIELDS + tuple(q for q, _ in ROBOT_FIELDS) + tuple(q for q, _ in IMAGE_FIELDS)


class _Recorder:
    """Snapshots of one env after `set_init_state` and after every simulator step (wraps the LIBERO env's methods)."""

    def __init__(self, env):
        self.env = env
        self.snaps: list[dict[str, np.ndarray]] = []
        self.images = False
        inner = env._env
        step, set_init_state = inner.step, inner.set_init_state

        def recording_step(action):
            out = step(action)
            self._snap(out[0])
            return out

        def recording_set_init_state(state):
            out = set_init_state(state)
            self._snap(out)
            return out

        inner.step, inner.set_init_state = recording_step, recording_set_init_state

    def _snap(self, raw: dict) -> None:
        sim = self.env.sim
        snap = {name: getattr(sim.model, name).copy() for name in MODEL_FIELDS}
        snap.update({name: np.atleast_1d(np.array(getattr(sim.data, name))) for name in DATA_FIELDS})
        snap.update({name: np.array(raw[key]) for name, key in ROBOT_FIELDS})
        if self.images:
            snap.update({name: np.array(raw[key]) for name, key in IMAGE_FIELDS if key in raw})
        self.snaps.append(snap)


def _actions(k: int, steps: int) -> np.ndarray:
    rng = np.random.default_rng(k)  # a generator of its own: numpy's global stream (the layouts) is left alone
    arm = rng.uniform(-ACTION_SCALE, ACTION_SCALE, (steps, 6))
    return np.concatenate([arm, rng.choice([-1.0, 1.0], (steps, 1))], axis=1)


def _dirty_actions(k: int) -> np.ndarray:
    a = _actions(10_000 + k, DIRTY_STEPS)
    a[:, -1] = 1.0  # close the gripper
    return a


def _episode(env, rec: _Recorder, task_id: int, k: int, rng_state, actions: np.ndarray) -> list[dict]:
    """Reset to init state k with the given layout stream, then the actions; images on the last step only."""
    rec.snaps, rec.images = [], len(actions) == 0
    env.set_render(len(actions) == 0)  # no policy steps: the last wait step renders
    env.reset(options={"task_id": task_id, "init_state": k, "rng_state": rng_state})
    for i, a in enumerate(actions):
        last = i == len(actions) - 1
        rec.images = last
        env.set_render(last)
        env.step(a)
    rec.images = False
    snaps, rec.snaps = rec.snaps, []
    return snaps


def _dirty(env, actions: np.ndarray) -> None:
    for a in actions:
        env.set_render(False)
        env.step(a)


@dataclass
class Difference:
    first_step: int
    max_abs_diff: float


@dataclass
class PairResult:
    task_id: int
    init_state: int
    identical: bool
    first_quantity: str | None = None
    first_step: int | None = None
    """0 = after set_init_state, 1..wait = wait steps, then the policy steps."""
    first_at: str | None = None
    max_abs_diff: float | None = None
    """Of the first differing quantity, over the whole episode."""
    differences: dict[str, Difference] = field(default_factory=dict)
    error: str | None = None


def _step_label(i: int, wait: int) -> str:
    return "after set_init_state" if i == 0 else f"wait step {i}" if i <= wait else f"step {i - wait}"


def compare(a: list[dict], b: list[dict], wait: int) -> tuple[bool, dict[str, Difference], str | None]:
    """(identical, quantity -> first step and max |diff|, first differing quantity)."""
    if len(a) != len(b):
        raise ValueError(f"episodes of different lengths ({len(a)} and {len(b)} snapshots)")
    diffs: dict[str, Difference] = {}
    first = None
    for i, (sa, sb) in enumerate(zip(a, b, strict=True)):
        for q in QUANTITIES:
            if q not in sa or q not in sb:
                continue
            x, y = sa[q], sb[q]
            if x.shape == y.shape and x.dtype == y.dtype and x.tobytes() == y.tobytes():
                continue
            d = (
                float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))))
                if x.shape == y.shape
                else float("inf")
            )
            if q not in diffs:
                diffs[q] = Difference(i, d)
                if first is None:
                    first = q
            else:
                diffs[q].max_abs_diff = max(diffs[q].max_abs_diff, d)
    return not diffs, diffs, first


def check_task(
    suite: str, task_id: int, states: list[int], steps: int, resolution: int = 64, raw_soft_reset: bool = False
) -> list[PairResult]:
    from pi0_lightning.envs.libero import LiberoEnv, LiberoEnvConfig

    def make(hard: bool):
        config = LiberoEnvConfig(suite=suite, resolution=resolution, hard_reset=hard)
        if not hard and raw_soft_reset:
            config.clear_soft_reset_leftovers = False
        return LiberoEnv(config)

    hard, soft = make(True), make(False)
    results = []
    try:
        n = max(states) + 2
        streams = soft.reset_streams(task_id, n)  # builds B; A builds in its own call (same draws)
        hard.reset_streams(task_id, 1)
        rec_a, rec_b = _Recorder(hard), _Recorder(soft)
        wait = soft.config.num_steps_wait
        # B's first compared episode follows another one (here: another init state's), ending on a closed gripper
        other = (states[0] + 1) % len(soft.init_states)
        _episode(soft, rec_b, task_id, other, streams[n - 1], _actions(other, 0))
        _dirty(soft, _dirty_actions(other))
        for k in states:
            try:
                actions = _actions(k, steps)
                snaps_a = _episode(hard, rec_a, task_id, k, streams[k], actions)
                snaps_b = _episode(soft, rec_b, task_id, k, streams[k], actions)
                _dirty(soft, _dirty_actions(k))
                identical, diffs, first = compare(snaps_a, snaps_b, wait)
                r = PairResult(task_id, k, identical, differences=diffs)
                if first is not None:
                    r.first_quantity, r.first_step = first, diffs[first].first_step
                    r.first_at, r.max_abs_diff = _step_label(r.first_step, wait), diffs[first].max_abs_diff
            except Exception as e:  # one failing reset (e.g. a placement that cannot be sampled) is reported
                message = str(e).splitlines()[0] if str(e) else ""
                r = PairResult(task_id, k, False, error=f"{type(e).__name__}: {message}")
            results.append(r)
    finally:
        hard.close()
        soft.close()
    return results


@dataclass
class SuiteReport:
    suite: str
    pairs: int
    identical: int
    errors: int
    first_quantities: dict[str, int]
    """First differing quantity -> number of pairs."""
    max_abs_diff: dict[str, float]
    """Differing quantity -> largest |diff| over the suite's pairs."""
    results: list[PairResult]


def summarize(suite: str, results: list[PairResult]) -> SuiteReport:
    first: dict[str, int] = {}
    worst: dict[str, float] = {}
    for r in results:
        if r.first_quantity is not None:
            first[r.first_quantity] = first.get(r.first_quantity, 0) + 1
        for q, d in r.differences.items():
            worst[q] = max(worst.get(q, 0.0), d.max_abs_diff)
    errors = sum(r.error is not None for r in results)
    return SuiteReport(suite, len(results), sum(r.identical for r in results), errors, first, worst, results)


def table(reports: list[SuiteReport]) -> list[str]:
    header = f"{'suite':<16} {'pairs':>5} {'identical':>9} {'differ':>6} {'errors':>6}"
    lines = [header + "  first differing quantity (pairs)"]
    for rep in reports:
        differ = rep.pairs - rep.identical - rep.errors
        first = ", ".join(f"{q} ({n})" for q, n in sorted(rep.first_quantities.items(), key=lambda x: -x[1])) or "-"
        lines.append(f"{rep.suite:<16} {rep.pairs:>5} {rep.identical:>9} {differ:>6} {rep.errors:>6}  {first}")
    for rep in reports:
        for r in rep.results:
            if r.error is not None:
                lines.append(f"  {rep.suite} task {r.task_id} init {r.init_state}: error {r.error}")
            elif not r.identical:
                others = ", ".join(
                    f"{q} {d.max_abs_diff:.3g}" for q, d in r.differences.items() if q != r.first_quantity
                )
                lines.append(
                    f"  {rep.suite} task {r.task_id} init {r.init_state}: {r.first_quantity} first differs "
                    f"{r.first_at}, max |diff| {r.max_abs_diff:.3g}" + (f"; also {others}" if others else "")
                )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pi0_lightning.envs.reset_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--suites", required=True, help="comma-separated LIBERO suites")
    p.add_argument("--tasks", default="all", help="'all' or comma-separated task indices or names (every suite)")
    p.add_argument("--init-states", type=int, default=50, help="the first N official init states per task")
    p.add_argument("--steps", type=int, default=20, help="policy steps after the wait steps")
    p.add_argument("--resolution", type=int, default=64, help="camera render size for the last-step images")
    p.add_argument("--raw-soft-reset", action="store_true", help="robosuite's soft reset without LiberoEnv's clearing")
    p.add_argument("--out", help="write the JSON report here")
    args = p.parse_args(argv)
    for name, low in (("init_states", 1), ("steps", 0), ("resolution", 1)):
        if getattr(args, name) < low:
            print(f"reset_check: error: --{name.replace('_', '-')} must be at least {low}", file=sys.stderr)
            return 2
    try:
        from pi0_lightning.envs.libero import UnknownTaskError, resolve_tasks
    except ImportError as e:  # pragma: no cover - gymnasium missing
        print(f"reset_check: error: {e}", file=sys.stderr)
        return 1
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    try:
        plan = [(s, resolve_tasks(s, args.tasks)) for s in suites]
    except UnknownTaskError as e:
        print(f"reset_check: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"reset_check: error: {e}", file=sys.stderr)
        return 1
    if not suites:
        print("reset_check: error: no suite given", file=sys.stderr)
        return 2

    start = time.perf_counter()
    reports = []
    for suite, tasks in plan:
        results = []
        for task in tasks:
            states = list(range(min(args.init_states, task.num_eval_init_states)))
            results += check_task(suite, task.task_id, states, args.steps, args.resolution, args.raw_soft_reset)
        reports.append(summarize(suite, results))
    seconds = time.perf_counter() - start
    print("\n".join(table(reports)))
    print(f"{sum(r.pairs for r in reports)} pairs in {seconds:.0f} s")
    if args.out:
        payload = {
            "suites": suites,
            "tasks": args.tasks,
            "init_states": args.init_states,
            "steps": args.steps,
            "resolution": args.resolution,
            "raw_soft_reset": args.raw_soft_reset,
            "quantities": list(QUANTITIES),
            "seconds": seconds,
            "reports": [asdict(r) for r in reports],
        }
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
