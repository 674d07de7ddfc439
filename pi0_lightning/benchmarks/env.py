"""LIBERO env throughput through the real EnvPool (no policy): env steps/s with cameras rendered every step versus
only at chunk starts (render-on-use), per worker count and per suite, plus peak RSS per worker. Prints markdown.

    python -m pi0_lightning.benchmarks.env [--workers 1 2 4] [--steps 100] [--replan-steps 5]
        [--suites libero_spatial libero_object libero_goal libero_10 libero_90]

Actions are small random deltas (uniform in [-0.2, 0.2], gripper -1, fixed seed); every worker runs task 0 of the
suite from initial state 0. Only the stepping is timed, in alternating blocks of `--replan-steps` steps per mode; env
build + first reset and a later reset are reported apart.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from functools import partial

import numpy as np

from pi0_lightning.envs.libero import LiberoEnv, LiberoEnvConfig, setup_rendering
from pi0_lightning.envs.pool import EnvPool, WorkerFailure

MODES = ("every", "on-use")


def check(results: list) -> list:
    failures = [r for r in results if isinstance(r, WorkerFailure)]
    if failures:
        raise RuntimeError(f"env worker failed: {failures[0].reason}")
    return results


def peak_rss_gib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 2**20


def bench(suite: str, workers: int, steps: int, replan: int) -> dict:
    """One pool: build + reset, then ~`2 * steps` timed lockstep steps per worker in blocks of `replan` steps that
    alternate between the two modes (rendering does not change the physics), so that load from other processes
    hits both modes alike; then one more reset, timed."""
    ids = list(range(workers))
    options = [{"task_id": 0, "init_state": 0}] * workers
    rng = np.random.default_rng(0)
    blocks = max(1, round(steps / replan))  # per mode
    seconds = dict.fromkeys(MODES, 0.0)
    out = {}
    with EnvPool(partial(LiberoEnv, LiberoEnvConfig(suite=suite)), workers, env_vars=render_env_vars()) as pool:
        t0 = time.perf_counter()
        check(pool.reset(ids, options=options))
        out["build_reset_s"] = time.perf_counter() - t0
        for block in range(2 * blocks):
            mode = MODES[block % 2]
            for j in range(replan):
                actions = [np.append(rng.uniform(-0.2, 0.2, 6), -1.0) for _ in ids]
                render = mode == "every" or j == replan - 1  # on-use: the last step of each chunk
                t0 = time.perf_counter()
                check(pool.step(ids, actions, [render] * workers))
                seconds[mode] += time.perf_counter() - t0
        for mode in MODES:
            out[mode] = blocks * replan * workers / seconds[mode]
        out["rss_gib"] = [peak_rss_gib(p.pid) for p in pool._procs]
        t0 = time.perf_counter()
        check(pool.reset(ids, options=options))
        out["reset_s"] = time.perf_counter() - t0
    return out


RENDER_VARS = ("MUJOCO_GL", "PYOPENGL_PLATFORM", "MUJOCO_EGL_DEVICE_ID", "LIBERO_CONFIG_PATH")


def render_env_vars() -> dict[str, str]:
    """The rendering / LIBERO variables of this process, passed to the workers explicitly (a forkserver keeps the
    environment it started with)."""
    return {k: os.environ[k] for k in RENDER_VARS if k in os.environ}


def machine() -> str:
    info = {}
    for path in ("/proc/cpuinfo", "/proc/meminfo"):
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    cpu = info.get("model name") or platform.processor() or platform.machine()
    ram = int(info["MemTotal"].split()[0]) / 2**20
    return (
        f"machine: {cpu}, {os.cpu_count()} cores, {ram:.1f} GiB RAM, MUJOCO_GL={os.environ['MUJOCO_GL']}, "
        f"date {datetime.date.today()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--suites", nargs="+", default=[
        "libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90"
    ])  # fmt: skip
    parser.add_argument("--steps", type=int, default=100, help="timed env steps per worker per configuration")
    parser.add_argument("--replan-steps", type=int, default=5, help="on-use renders once every this many steps")
    args = parser.parse_args()
    setup_rendering()
    print(machine())
    print(f"{args.steps} steps per worker per configuration; on-use renders 1 step in {args.replan_steps}")
    results = {}

    def get(suite: str, workers: int) -> dict:
        if (suite, workers) not in results:
            results[suite, workers] = bench(suite, workers, args.steps, args.replan_steps)
        return results[suite, workers]

    print("\n| workers | build + reset (s) | reset (s) | render=every steps/s (per worker) "
          "| render=on-use steps/s (per worker) | speed-up |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for w in args.workers:
        r = get("libero_spatial", w)
        every, on_use = r["every"], r["on-use"]
        print(
            f"| {w} | {r['build_reset_s']:.1f} | {r['reset_s']:.1f} | {every:.1f} ({every / w:.1f}) "
            f"| {on_use:.1f} ({on_use / w:.1f}) | {on_use / every:.1f}x |",
            flush=True,
        )

    print("\n| suite (task 0, 1 worker) | render=every steps/s | render=on-use steps/s | speed-up |")
    print("|---|---|---|---|")
    for s in args.suites:
        r = get(s, 1)
        print(f"| {s} | {r['every']:.1f} | {r['on-use']:.1f} | {r['on-use'] / r['every']:.1f}x |", flush=True)

    print("\n| suite | workers | peak RSS per worker (GiB, VmHWM) |\n|---|---|---|")
    for (s, w), r in results.items():
        print(f"| {s} | {w} | {', '.join(f'{x:.2f}' for x in r['rss_gib'])} |")


if __name__ == "__main__":
    main()
