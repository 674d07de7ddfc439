"""End-to-end LIBERO rollout throughput: the real EnvPool and RolloutCollector driven by a PI0 `LiberoPolicy`.

    python -m pi0_lightning.benchmarks.rollout [--workers 8 16] [--phase env|e2e|prepare|all] [--max-steps 60]
    python -m pi0_lightning.benchmarks.rollout --variant pi0_tiny --device cpu --workers 2 --max-steps 10  # smoke

env phase: a 1-worker warm-up pool first (robosuite's numba kernels compile on first use, 10-20 s, which would
otherwise land in the first configuration's build time), then `benchmarks.env.bench` per worker count (cameras
rendered at every step versus only at chunk starts; no policy).

e2e phase, per worker count W: a fresh pool of W LIBERO workers; build + reset of all W envs (timed), the first
batched `policy.act` at batch W (CUDA-graph capture, plus compilation of the transformer blocks with `--compile`;
timed apart as "capture"), 3 more calls (steady latency); then the timed part, `RolloutCollector.collect` of
W x `--episodes-per-worker` episodes (tasks round-robin over the suite, `--max-steps` policy steps, replanning every
`--replan` steps, `sync_horizon` so that the batch stays W and no graph is captured mid-run). Reported: env steps/s
over the whole collect (LIBERO hard resets with their 10 wait steps included) and without the resets, the policy's
share of the wall time and its time per call (image transforms and tokenisation included).

prepare phase: the policy's main-process input preparation alone, at batch = each worker count (see
`prepare_phase`).

Deliberate simplifications: random weights (speed does not depend on them) and identity norm stats, so episodes
practically never succeed and every one runs the full `--max-steps`: the timing is reproducible, not a success rate.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from pi0_lightning.benchmarks import write_json
from pi0_lightning.benchmarks.env import bench, check, machine, render_env_vars
from pi0_lightning.benchmarks.gpu import time_ms
from pi0_lightning.envs.libero import LiberoEnv, LiberoEnvConfig, setup_rendering, suite_tasks
from pi0_lightning.envs.pool import EnvPool
from pi0_lightning.rollout.collector import CollectorConfig, RolloutCollector
from pi0_lightning.rollout.types import EpisodeRequest

E2E_COLUMNS = (
    "| workers | episodes | env steps | wall (s) | env steps/s | steps/s w/o resets | policy share "
    "| policy ms/call (calls) | resets (s) | build + reset (s) | first call = capture (s) | steady call (ms) "
    "| peak GPU (GiB) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
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
    """Wrap `pool.reset` so that the time spent in resets accumulates in the returned one-element list."""
    spent = [0.0]
    reset = pool.reset

    def timed(*a, **kw):
        t0 = time.perf_counter()
        try:
            return reset(*a, **kw)
        finally:
            spent[0] += time.perf_counter() - t0

    pool.reset = timed
    return spent


def e2e_workers(args: argparse.Namespace, policy, w: int) -> dict:
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tasks = suite_tasks(args.suite)
    n = len(tasks)
    requests = [
        EpisodeRequest(tasks[k % n].task_id, k // n, tasks[k % n].language, seed=k)
        for k in range(w * args.episodes_per_worker)
    ]
    env_cfg = LiberoEnvConfig(suite=args.suite, max_steps=args.max_steps)
    with EnvPool(partial(LiberoEnv, env_cfg), w, env_vars={**render_env_vars(), "OMP_NUM_THREADS": "1"}) as pool:
        t0 = time.perf_counter()
        options = [{"task_id": r.task_id, "init_state": r.init_state} for r in requests[:w]]
        obs = [o for o, _ in check(pool.reset(list(range(w)), options=options))]
        build_reset_s = time.perf_counter() - t0
        inputs = policy.prepare(obs, [r.prompt for r in requests[:w]])
        calls = []
        for i in range(4):  # the first one captures the graph (and compiles)
            sync()
            t0 = time.perf_counter()
            policy.act(inputs, seed=i)
            sync()
            calls.append(time.perf_counter() - t0)
        resets = _timed_resets(pool)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        config = CollectorConfig(replan_steps=args.replan, max_steps=args.max_steps, sync_horizon=True, progress=False)
        results, stats = RolloutCollector(pool, policy, config).collect(requests, desc=f"w={w}")
    wall = stats.wall_seconds
    return {
        "workers": w,
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
        "build_reset_s": build_reset_s,
        "capture_s": calls[0],
        "steady_call_ms": 1000 * float(np.median(calls[1:])),
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
    }


def e2e_row(r: dict) -> str:
    invalid = f" ({r['invalid']} invalid)" if r["invalid"] else ""
    return (
        f"| {r['workers']} | {r['episodes']}{invalid} | {r['env_steps']} | {r['wall_s']:.1f} | {r['steps_per_s']:.1f} "
        f"| {r['steps_per_s_no_reset']:.1f} | {100 * r['policy_share']:.0f}% "
        f"| {r['policy_ms_per_call']:.1f} ({r['policy_calls']}) | {r['reset_s']:.1f} | {r['build_reset_s']:.1f} "
        f"| {r['capture_s']:.1f} | {r['steady_call_ms']:.1f} | {r['peak_gpu_gib']:.1f} |"
    )


def prepare_phase(args: argparse.Namespace) -> list[dict]:
    """Main-process input preparation of the policy (rotate + resize of both cameras, state, tokens:
    `policy.prepare`; float conversion and batching: `policy.to_observation`) on synthetic 256 x 256 renders, median
    of 20 calls per batch size, no simulator."""
    instructions = [t.language for t in suite_tasks(args.suite)]
    policy = build_policy(args, instructions)
    cpu = torch.device("cpu")  # the timed work is host-side: wall-clock medians
    rng = np.random.default_rng(0)
    print("\n| batch | prepare (ms) | to_observation (ms) | per observation (ms) |\n|---|---|---|---|")
    rows = []
    for w in args.workers:
        obs = [
            {
                "agentview": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
                "wrist": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
                "eef_pos": np.zeros(3),
                "eef_quat": np.array([0.0, 0.0, 0.0, 1.0]),
                "gripper_qpos": np.zeros(2),
            }
            for _ in range(w)
        ]
        prompts = [instructions[0]] * w
        inputs = policy.prepare(obs, prompts)
        prepare_ms = time_ms(partial(policy.prepare, obs, prompts), cpu, warmup=1, repeats=20)
        observation_ms = time_ms(partial(policy.to_observation, inputs), cpu, warmup=1, repeats=20)
        rows.append({"batch": w, "prepare_ms": prepare_ms, "to_observation_ms": observation_ms})
        print(f"| {w} | {prepare_ms:.1f} | {observation_ms:.1f} | {(prepare_ms + observation_ms) / w:.2f} |")
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
        rows.append(e2e_workers(args, policy, w))
        print(e2e_row(rows[-1]), flush=True)  # row by row: a later, larger configuration may be cut off
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phase", choices=["env", "e2e", "prepare", "all"], default="all")
    p.add_argument("--workers", type=int, nargs="+", default=[8, 16])
    p.add_argument("--suite", default="libero_spatial")
    p.add_argument("--variant", default="pi0", help="PI0 variant (pi0: full size; pi0_tiny for a CPU smoke run)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-steps", type=int, default=60, help="policy steps per episode (e2e)")
    p.add_argument("--replan", type=int, default=5, help="actions executed per chunk (openpi LIBERO: 5)")
    p.add_argument("--episodes-per-worker", type=int, default=1)
    p.add_argument("--denoise-steps", type=int, default=10)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="compiled blocks (CUDA)")
    p.add_argument("--env-steps", type=int, default=60, help="timed steps per worker and mode (env phase)")
    p.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("rollout benchmark: error: no CUDA device (use --device cpu with --variant pi0_tiny)")
    setup_rendering()  # before anything imports robosuite / MuJoCo
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
