"""Rollout throughput: the real EnvPool and RolloutCollector, lockstep versus pipelined, on LIBERO with a PI0
`LiberoPolicy` or on the reach env with a stand-in policy.

    python -m pi0_lightning.benchmarks.rollout [--workers 8 16] [--phase env|e2e|prepare|all] [--max-steps 60]
        [--groups 1 2]
    python -m pi0_lightning.benchmarks.rollout --variant pi0_tiny --device cpu --workers 2 --max-steps 10  # smoke
    python -m pi0_lightning.benchmarks.rollout --phase reach --workers 16 --groups 1 2 4  # CPU only, no LIBERO
    python -m pi0_lightning.benchmarks.rollout --phase prepare --variant pi0_tiny --device cpu --workers 16  # CPU

env phase: a 1-worker warm-up pool first (robosuite's numba kernels compile on first use, 10-20 s, which would
otherwise land in the first configuration's build time), then `benchmarks.env.bench` per worker count (cameras
rendered at every step versus only at chunk starts; no policy).

e2e phase, per worker count W and group count G (`--groups`; 1 = lockstep, G >= 2 = pipelined): a fresh pool of W
LIBERO workers; build + reset of all W envs (timed), the first batched `policy.act` at the batch size of a group
(W / G; CUDA-graph capture, plus compilation of the transformer blocks with `--compile`; timed apart as "capture"),
3 more calls (steady latency); pipelined runs also capture every smaller batch size first, since a group's batch
shrinks while some of its workers reset. Then the timed part, `RolloutCollector.collect` of W x
`--episodes-per-worker` episodes (tasks round-robin over the suite, `--max-steps` policy steps, replanning every
`--replan` steps; lockstep with `sync_horizon`, so that the batch stays W; `--reset soft` between episodes, as
training rollouts reset, or `hard`, as official evaluation). Reported: env steps/s over the whole collect (resets
with their 10 wait steps included) and without the time in which only reset rounds were in flight ("resets":
lockstep, the waves' resets; pipelined, only what no chunk round overlapped, an approximation), the share of the
workers' time spent resetting (as they time it), the policy's share of the wall time and its time per call (image
transforms and tokenisation included). The workers
return their camera images upright at the model's input size (`LiberoEnvConfig.image_size`), as training and
evaluation run them; `--env-images raw` sends the renders as they are (the policy rotates and resizes them).

prepare phase: the policy's main-process input preparation alone, at batch = each worker count, from raw renders
versus from images the env workers prepared, with the bytes one observation takes through a worker pipe (see
`prepare_phase`).

reach phase (not part of `all`): lockstep versus pipelined collection, with no GPU and no LIBERO. The workers run the
reach env (`envs/reach.py`) paced to a simulated cost per step and per reset (`--step-ms`, `--reset-ms`: sleeps,
i.e. a worker with a core of its own, as the LIBERO workers of the GPU machine), and the policy is a stand-in that
sleeps `--policy-ms` + `--policy-ms-per-row` x batch per call (the main process idles while it waits, as for a CUDA
call) and returns seeded random actions, so that some episodes reach their target early (varied lengths, as in RL).
The defaults model the GPU machine's measurements (BENCHMARKS.md: 20.9 steps/s per LIBERO worker with on-use
rendering, 2.6 s resets, PI0 ~90 ms per call at batch 8 and ~140 ms at batch 16). Reported per worker count and
group count: env steps/s, the speed-up over lockstep, the policy's share of the wall time, its calls and mean batch.

Deliberate simplifications: random weights (speed does not depend on them) and identity norm stats, so LIBERO
episodes practically never succeed and every one runs the full `--max-steps`: the timing is reproducible, not a
success rate.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from functools import partial
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np

from pi0_lightning.benchmarks import write_json
from pi0_lightning.benchmarks.env import bench, check, machine, render_env_vars
from pi0_lightning.envs.libero import LiberoEnv, LiberoEnvConfig, setup_rendering, suite_tasks
from pi0_lightning.envs.pool import EnvPool
from pi0_lightning.envs.reach import ReachEnv, ReachEnvConfig, reach_tasks
from pi0_lightning.rollout.collector import CollectorConfig, RolloutCollector
from pi0_lightning.rollout.types import EpisodeRequest

# torch is imported where it is used: reach workers import this module (for `PacedReachEnv`) and need no torch

E2E_COLUMNS = (
    "| workers | groups | episodes | env steps | wall (s) | env steps/s | steps/s w/o resets | policy share "
    "| policy ms/call (calls) | resets (s) | worker time resetting | build + reset (s) | first call = capture (s) "
    "| steady call (ms) | peak GPU (GiB) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)
REACH_COLUMNS = (
    "| workers | groups | episodes | env steps | wall (s) | env steps/s | vs lockstep | policy share "
    "| policy calls | mean batch | successes |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def env_phase(args: argparse.Namespace) -> list[dict]:
    t0 = time.perf_counter()
    with EnvPool(partial(LiberoEnv, LiberoEnvConfig(suite=args.suite)), 1, env_vars=render_env_vars()) as pool:
        check(pool.reset([0], options=[{"task_id": 0, "init_state": 0}]))
        check(pool.step([0], [np.append(np.zeros(6), -1.0)], [True]))
    print(f"env warm-up (1 worker: numba JIT, build, reset, 1 step): {time.perf_counter() - t0:.1f} s", flush=True)
    print("\n| workers | build + reset (s) | reset (s) | render=every steps/s (per worker) "
          "| render=on-use steps/s (per worker) | peak RSS per worker (GiB) |\n|---|---|---|---|---|---|")  # fmt: skip
    rows = []
    for w in args.workers:
        r = {"workers": w, **bench(args.suite, w, args.env_steps, args.replan)}
        rows.append(r)
        print(
            f"| {w} | {r['build_reset_s']:.1f} | {r['reset_s']:.1f} | {r['every']:.1f} ({r['every'] / w:.1f}) "
            f"| {r['on-use']:.1f} ({r['on-use'] / w:.1f}) | {max(r['rss_gib']):.2f} |",
            flush=True,
        )
    return rows


def build_policy(args: argparse.Namespace, instructions: list[str]):
    import torch

    from pi0_lightning.checkpoint import build_model
    from pi0_lightning.envs.spec import identity_norm_stats
    from pi0_lightning.model.config import PI0Config
    from pi0_lightning.model.graphs import use_tf32
    from pi0_lightning.model.speed import SpeedConfig
    from pi0_lightning.policy.assets import small_prompt_tokenizer
    from pi0_lightning.policy.pi0_libero import LiberoPolicy

    use_tf32()
    cuda = args.device.startswith("cuda")
    torch.manual_seed(0)
    model = build_model(PI0Config.variant(args.variant), device=args.device)
    model = model.apply_dtype_policy("bfloat16" if cuda else "float32").eval()
    tokenizer = small_prompt_tokenizer(
        instructions, Path(tempfile.mkdtemp(prefix="bench_rollout_")) / "tok.model", min(1000, model.config.vocab_size)
    )
    policy = LiberoPolicy.build(
        model,
        identity_norm_stats(),
        tokenizer,
        delta_actions=True,
        num_steps=args.denoise_steps,
        device=args.device,
        speed=SpeedConfig(cuda_graphs=True, compile=args.compile) if cuda else None,
    )
    params = sum(p.numel() for p in model.parameters())
    print(f"model {args.variant} ({params / 1e9:.2f} B parameters) on {args.device}, compile={cuda and args.compile}")
    return policy


def _timed_resets(pool: EnvPool) -> list[float]:
    """Wrap `pool.submit` / `pool.gather` so that the wall time during which reset rounds and no other rounds are in
    flight accumulates in the returned one-element list: lockstep, the time of the waves' resets; pipelined, the
    resets that no chunk round overlapped (the policy may have been computing meanwhile)."""
    spent = [0.0]
    submit, gather = pool.submit, pool.gather
    resets: dict[int, bool] = {}  # id(round in flight) -> whether it only resets
    since = [time.perf_counter()]

    def account() -> None:
        now = time.perf_counter()
        if resets and all(resets.values()):
            spent[0] += now - since[0]
        since[0] = now

    def timed_submit(workers, commands):
        rnd = submit(workers, commands)
        account()
        resets[id(rnd)] = all(c.calls[-1][0] == "reset" for c in commands)
        return rnd

    def timed_gather(rnd):
        out = gather(rnd)
        account()
        resets.pop(id(rnd), None)
        return out

    pool.submit, pool.gather = timed_submit, timed_gather
    return spent


def e2e_workers(args: argparse.Namespace, policy, w: int, groups: int = 1) -> dict:
    import torch

    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tasks = suite_tasks(args.suite)
    n = len(tasks)
    requests = [
        EpisodeRequest(tasks[k % n].task_id, k // n, tasks[k % n].language, seed=k)
        for k in range(w * args.episodes_per_worker)
    ]
    image_size = policy.transforms.image_size if args.env_images == "prepared" else None
    env_cfg = LiberoEnvConfig(
        suite=args.suite, max_steps=args.max_steps, image_size=image_size, hard_reset=args.reset == "hard"
    )
    with EnvPool(partial(LiberoEnv, env_cfg), w, env_vars={**render_env_vars(), "OMP_NUM_THREADS": "1"}) as pool:
        t0 = time.perf_counter()
        options = [{"task_id": r.task_id, "init_state": r.init_state} for r in requests[:w]]
        obs = [o for o, _ in check(pool.reset(list(range(w)), options=options))]
        build_reset_s = time.perf_counter() - t0
        batch = math.ceil(w / groups)  # the largest group
        inputs = policy.prepare(obs[:batch], [r.prompt for r in requests[:batch]])
        calls = []
        for i in range(4):  # the first one captures the graph (and compiles)
            sync()
            t0 = time.perf_counter()
            policy.act(inputs, seeds=[1000 * i + k for k in range(batch)])
            sync()
            calls.append(time.perf_counter() - t0)
        if groups > 1:  # a group's batch shrinks while some of its workers reset: capture those sizes too
            for b in range(1, batch):
                policy.act(inputs[:b], seeds=list(range(b)))
            sync()
        resets = _timed_resets(pool)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        config = CollectorConfig(
            replan_steps=args.replan,
            max_steps=args.max_steps,
            sync_horizon=groups == 1,
            pipeline_groups=groups,
            progress=False,
        )
        results, stats = RolloutCollector(pool, policy, config).collect(requests, desc=f"w={w} g={groups}")
    wall = stats.wall_seconds
    return {
        "workers": w,
        "groups": groups,
        "env_images": args.env_images,
        "episodes": stats.episodes,
        "invalid": sum(not r.valid for r in results),
        "env_steps": stats.env_steps,
        "wall_s": wall,
        "steps_per_s": stats.env_steps / wall,
        "steps_per_s_no_reset": stats.env_steps / max(wall - resets[0], 1e-9),
        "policy_calls": stats.policy_calls,
        "policy_share": stats.policy_seconds / wall,
        "policy_ms_per_call": 1000 * stats.policy_seconds / max(stats.policy_calls, 1),
        "reset_s": resets[0],
        "reset": args.reset,
        "reset_worker_share": stats.reset_seconds / max(w * wall, 1e-9),
        "build_reset_s": build_reset_s,
        "capture_s": calls[0],
        "steady_call_ms": 1000 * float(np.median(calls[1:])),
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
    }


def e2e_row(r: dict) -> str:
    invalid = f" ({r['invalid']} invalid)" if r["invalid"] else ""
    return (
        f"| {r['workers']} | {r['groups']} | {r['episodes']}{invalid} | {r['env_steps']} | {r['wall_s']:.1f} "
        f"| {r['steps_per_s']:.1f} | {r['steps_per_s_no_reset']:.1f} | {100 * r['policy_share']:.0f}% "
        f"| {r['policy_ms_per_call']:.1f} ({r['policy_calls']}) | {r['reset_s']:.1f} "
        f"| {100 * r.get('reset_worker_share', 0.0):.0f}% | {r['build_reset_s']:.1f} "
        f"| {r['capture_s']:.1f} | {r['steady_call_ms']:.1f} | {r['peak_gpu_gib']:.1f} |"
    )


def pipe_bytes(obs: dict) -> int:
    """Bytes of one observation as an env worker's reply pickles it (`multiprocessing`'s pickler)."""
    return len(ForkingPickler.dumps(obs))


def prepare_phase(args: argparse.Namespace) -> list[dict]:
    """Main-process input preparation of the policy (`policy.prepare`: rotate + resize of both cameras, state,
    tokens; `policy.to_observation`: float conversion and batching) on synthetic 256 x 256 renders, median of 20
    calls per batch size, no simulator. Each batch is timed twice: as raw renders, and as the env workers send them
    with `LiberoEnvConfig.image_size` (`prepare_camera_images` applied to the same renders, "images_prepared"), for
    which `prepare` only checks sizes; both must give identical inputs. Also reported: the pickled bytes of one
    observation (what a worker pipe carries) and the worker-side cost of preparing one observation's two images."""
    import torch

    from pi0_lightning.benchmarks.gpu import time_ms
    from pi0_lightning.policy.transforms import PREPARED_IMAGES_KEY, prepare_camera_images

    instructions = [t.language for t in suite_tasks(args.suite)]
    policy = build_policy(args, instructions)
    size = policy.transforms.image_size
    cpu = torch.device("cpu")  # the timed work is host-side: wall-clock medians
    rng = np.random.default_rng(0)
    print(
        "\n| batch | images | prepare (ms) | to_observation (ms) | per observation (ms) | pickled bytes per obs "
        "|\n|---|---|---|---|---|---|"
    )
    rows = []
    for w in args.workers:
        raw = [
            {
                "agentview": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
                "wrist": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
                "eef_pos": np.zeros(3),
                "eef_quat": np.array([0.0, 0.0, 0.0, 1.0]),
                "gripper_qpos": np.zeros(2),
            }
            for _ in range(w)
        ]
        prepared = []
        for o in raw:
            agent, wrist = prepare_camera_images(o["agentview"], o["wrist"], size)
            prepared.append({**o, "agentview": agent, "wrist": wrist, PREPARED_IMAGES_KEY: True})
        one = raw[0]
        env_ms = time_ms(partial(prepare_camera_images, one["agentview"], one["wrist"], size), cpu, 1, 20)
        prompts = [instructions[0]] * w
        inputs = policy.prepare(raw, prompts)
        identical = all(
            np.array_equal(getattr(a, f), getattr(b, f))
            for a, b in zip(inputs, policy.prepare(prepared, prompts), strict=True)
            for f in ("agentview", "wrist", "raw_state", "tokens", "token_mask")
        )
        row = {
            "batch": w,
            "image_size": size,
            "prepare_ms": time_ms(partial(policy.prepare, raw, prompts), cpu, warmup=1, repeats=20),
            "prepare_ms_prepared": time_ms(partial(policy.prepare, prepared, prompts), cpu, warmup=1, repeats=20),
            "to_observation_ms": time_ms(partial(policy.to_observation, inputs), cpu, warmup=1, repeats=20),
            "bytes_raw": pipe_bytes(raw[0]),
            "bytes_prepared": pipe_bytes(prepared[0]),
            "env_prepare_ms": env_ms,
            "identical_inputs": identical,
        }
        rows.append(row)
        for label, ms, nbytes in (
            ("raw 256", row["prepare_ms"], row["bytes_raw"]),
            (f"prepared {size}", row["prepare_ms_prepared"], row["bytes_prepared"]),
        ):
            per_obs = (ms + row["to_observation_ms"]) / w
            print(f"| {w} | {label} | {ms:.2f} | {row['to_observation_ms']:.1f} | {per_obs:.2f} | {nbytes:,} |")
    print(
        f"\nenv-prepared inputs identical to raw-render inputs: {all(r['identical_inputs'] for r in rows)}; "
        f"preparing one observation's two images in the env worker: {rows[-1]['env_prepare_ms']:.2f} ms",
        flush=True,
    )
    return rows


def e2e_phase(args: argparse.Namespace) -> list[dict]:
    policy = build_policy(args, [t.language for t in suite_tasks(args.suite)])
    print(
        f"{args.max_steps} policy steps per episode (plus 10 wait steps per reset), replan {args.replan}, "
        f"{args.episodes_per_worker} episode(s) per worker\n\n{E2E_COLUMNS}",
        flush=True,
    )
    rows = []
    for w in args.workers:
        for g in args.groups:
            rows.append(e2e_workers(args, policy, w, g))
            print(e2e_row(rows[-1]), flush=True)  # row by row: a later, larger configuration may be cut off
    return rows


class PacedReachEnv(ReachEnv):
    """The reach env at a simulated cost: `step_ms` per step and `reset_ms` per reset, slept (a worker with a core
    of its own: the pacing does not load the CPU)."""

    def __init__(self, config: ReachEnvConfig, step_ms: float, reset_ms: float):
        super().__init__(config)
        self.step_s, self.reset_s = step_ms / 1000, reset_ms / 1000

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        time.sleep(self.reset_s)
        return super().reset(seed=seed, options=options)

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        time.sleep(self.step_s)
        return super().step(action)


class DelayPolicy:
    """A stand-in for a GPU policy: each call sleeps `ms + ms_per_row * batch` milliseconds and returns random
    chunks, row k's from its own seed; env actions are the model actions times 0.5 (reach moves by (dx, dy))."""

    action_horizon = 10

    def __init__(self, ms: float, ms_per_row: float):
        self.ms, self.ms_per_row = ms, ms_per_row
        self.rows = 0

    def prepare(self, observations: list[dict], prompts: list[str]) -> list[np.ndarray]:
        return [np.asarray(o["eef_pos"], dtype=np.float32) for o in observations]

    def act(self, inputs: list[np.ndarray], seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
        time.sleep((self.ms + self.ms_per_row * len(inputs)) / 1000)
        self.rows += len(inputs)
        model = np.stack([np.random.default_rng(s).standard_normal((self.action_horizon, 7)) for s in seeds])
        return model.astype(np.float32), 0.5 * model.astype(np.float32)


def reach_workers(args: argparse.Namespace, w: int, groups: int) -> dict:
    # imported by name, so that the workers can unpickle the env factory also when this file runs as __main__
    from pi0_lightning.benchmarks.rollout import PacedReachEnv

    env_cfg = ReachEnvConfig(max_steps=args.max_steps)
    tasks = reach_tasks(env_cfg)
    requests = [
        EpisodeRequest(tasks[k % len(tasks)].task_id, k // len(tasks), tasks[k % len(tasks)].language, seed=k)
        for k in range(w * args.episodes_per_worker)
    ]
    policy = DelayPolicy(args.policy_ms, args.policy_ms_per_row)
    env_fn = partial(PacedReachEnv, env_cfg, args.step_ms, args.reset_ms)
    with EnvPool(env_fn, w, env_vars={"OMP_NUM_THREADS": "1"}) as pool:
        check(pool.call(list(range(w)), "set_render", args_list=[(True,)] * w))  # workers up, envs built
        config = CollectorConfig(
            replan_steps=args.replan, max_steps=args.max_steps, pipeline_groups=groups, seed=0, progress=False
        )
        results, stats = RolloutCollector(pool, policy, config).collect(requests, desc=f"w={w} g={groups}")
    return {
        "workers": w,
        "groups": groups,
        "episodes": stats.episodes,
        "invalid": sum(not r.valid for r in results),
        "successes": stats.successes,
        "env_steps": stats.env_steps,
        "wall_s": stats.wall_seconds,
        "steps_per_s": stats.env_steps_per_s,
        "policy_share": stats.policy_seconds / stats.wall_seconds,
        "policy_calls": stats.policy_calls,
        "mean_batch": policy.rows / max(stats.policy_calls, 1),
        "outcomes": [(r.success, r.length) for r in results],
    }


def reach_phase(args: argparse.Namespace) -> list[dict]:
    print(
        f"reach env paced to {args.step_ms:g} ms per step and {args.reset_ms:g} ms per reset; stand-in policy "
        f"{args.policy_ms:g} ms + {args.policy_ms_per_row:g} ms per row per call; {args.max_steps} steps per episode "
        f"at most, replan {args.replan}, {args.episodes_per_worker} episodes per worker\n\n{REACH_COLUMNS}",
        flush=True,
    )
    rows = []
    for w in args.workers:
        lockstep = None
        for g in args.groups:
            r = reach_workers(args, w, g)
            rows.append(r)
            lockstep = r["steps_per_s"] if g == 1 else lockstep
            speedup = f"{r['steps_per_s'] / lockstep:.2f}x" if lockstep else "-"
            invalid = f" ({r['invalid']} invalid)" if r["invalid"] else ""
            print(
                f"| {w} | {g} | {r['episodes']}{invalid} | {r['env_steps']} | {r['wall_s']:.1f} "
                f"| {r['steps_per_s']:.1f} | {speedup} | {100 * r['policy_share']:.0f}% | {r['policy_calls']} "
                f"| {r['mean_batch']:.1f} | {r['successes']} |",
                flush=True,
            )
        outcomes = {str(r["outcomes"]) for r in rows if r["workers"] == w}
        r = rows[-1]
        busy_s = (r["env_steps"] * args.step_ms + (r["episodes"] + r["invalid"]) * args.reset_ms) / 1000 / w
        print(
            f"\nworkers={w}: per-episode outcomes identical across group counts: {len(outcomes) == 1}; env-only "
            f"ceiling (the paced steps and resets spread evenly over the workers, no policy): "
            f"{r['env_steps'] / busy_s:.1f} env steps/s\n",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phase", choices=["env", "e2e", "prepare", "all", "reach"], default="all")
    p.add_argument("--workers", type=int, nargs="+", default=[8, 16])
    p.add_argument("--groups", type=int, nargs="+", default=[1], help="pipeline groups (e2e, reach); 1 = lockstep")
    p.add_argument("--suite", default="libero_spatial")
    p.add_argument("--variant", default="pi0", help="PI0 variant (pi0: full size; pi0_tiny for a CPU smoke run)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-steps", type=int, default=60, help="policy steps per episode (e2e)")
    p.add_argument("--replan", type=int, default=5, help="actions executed per chunk (openpi LIBERO: 5)")
    p.add_argument("--episodes-per-worker", type=int, default=1)
    p.add_argument("--denoise-steps", type=int, default=10)
    p.add_argument(
        "--env-images",
        choices=["prepared", "raw"],
        default="prepared",
        help="e2e: workers send images upright at the model's size (as training does) or as rendered",
    )
    p.add_argument(
        "--reset",
        choices=["soft", "hard"],
        default="soft",
        help="e2e: LIBERO reset kind between episodes (soft: as training rollouts; hard: as official evaluation)",
    )
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="compiled blocks (CUDA)")
    p.add_argument("--env-steps", type=int, default=60, help="timed steps per worker and mode (env phase)")
    p.add_argument("--step-ms", type=float, default=48.0, help="simulated cost of a reach step (reach)")
    p.add_argument("--reset-ms", type=float, default=2600.0, help="simulated cost of a reach reset (reach)")
    p.add_argument("--policy-ms", type=float, default=45.0, help="stand-in policy: ms per call (reach)")
    p.add_argument("--policy-ms-per-row", type=float, default=6.0, help="stand-in policy: ms per row (reach)")
    p.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    setup_rendering()  # before anything imports robosuite / MuJoCo
    if args.phase == "reach":
        print(f"{machine()}, python {sys.version.split()[0]}", flush=True)
        out = {"args": {k: str(v) for k, v in vars(args).items()}, "reach": reach_phase(args)}
        write_json(args.out, out)
        return out
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("rollout benchmark: error: no CUDA device (use --device cpu with --variant pi0_tiny)")
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    print(f"{machine()}{gpu}, python {sys.version.split()[0]}", flush=True)
    out: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    if args.phase in ("env", "all"):
        out["env"] = env_phase(args)
    if args.phase in ("e2e", "all"):
        out["e2e"] = e2e_phase(args)
    if args.phase in ("prepare", "all"):
        out["prepare"] = prepare_phase(args)
    write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
