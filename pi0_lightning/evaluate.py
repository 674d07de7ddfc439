"""Evaluate a checkpoint on LIBERO: per-task and per-suite success over the official initial states.

    python -m pi0_lightning.evaluate --checkpoint DIR --suite libero_spatial --tasks 0,1 --episodes 5

Protocol (openpi `examples/libero/main.py`): episode k of a task starts from official init state k; 10 wait steps;
replan every 5 actions; the suite's step limit. Each task's simulator is seeded once (7) and its episodes reset in
order from that random stream, so episode k sees the fixture layout openpi's episode k sees, whichever worker runs
it (`openpi_streams`). An episode whose env raises counts as a failure (and is reported), as in openpi. Writes
`results.json`, `results.md` (both carry the simulator stack) and (with --video N) mp4s of the first N episodes of
each task to --out. Success rates are summed across ranks with torchmetrics when run distributed (the Lightning
`validate` path reuses the same requests and counting). The env workers return camera images upright and resized to
the policy's input size (`LiberoEnvConfig.image_size`), which the policy then uses as they are.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from pi0_lightning.envs.libero import (
    NUM_STEPS_WAIT,
    SEED,
    SUITE_MAX_STEPS,
    LiberoEnv,
    LiberoEnvConfig,
    TaskInfo,
    UnknownTaskError,
    openpi_streams,
    resolve_tasks,
)
from pi0_lightning.rollout.collector import CollectorConfig, RolloutCollector
from pi0_lightning.rollout.metrics import TaskSuccessRate, count_episodes
from pi0_lightning.rollout.types import ChunkPolicy, EpisodeRequest, EpisodeResult, RolloutStats


@dataclass
class EvalResult:
    suite: str
    tasks: list[dict] = field(default_factory=list)
    success_rate: float = 0.0
    episodes: int = 0
    env_errors: int = 0
    """Episodes whose env raised or whose worker died: counted as failures."""
    stats: dict = field(default_factory=dict)
    stack: dict = field(default_factory=dict)
    """Simulator versions and render backend (`envs.physics.stack_versions`)."""

    def markdown(self) -> str:
        lines = [f"## {self.suite}: success {100 * self.success_rate:.1f}% over {self.episodes} episodes", ""]
        if self.stack:
            st = self.stack
            lines += [
                f"Simulator: MuJoCo {st['mujoco']}, robosuite {st['robosuite']}, {st['robot_model']}, "
                f"{st['libero_package']}, render {st['render_backend']}",
                "",
            ]
        lines += ["| task | instruction | episodes | successes | success rate |", "|---|---|---|---|---|"]
        for t in self.tasks:
            rate = "n/a" if math.isnan(t["success_rate"]) else f"{100 * t['success_rate']:.1f}%"
            lines.append(f"| {t['task_id']} | {t['language']} | {t['episodes']} | {t['successes']} | {rate} |")
        s = self.stats
        if s:
            lines += [
                "",
                f"env steps/s: {s['env_steps_per_s']:.1f}; policy: {s['policy_ms_per_call']:.0f} ms per batched call; "
                f"wall: {s['wall_seconds']:.0f} s; env errors (counted as failures): {self.env_errors}",
            ]
        return "\n".join(lines) + "\n"


def eval_requests(
    tasks: list[TaskInfo],
    episodes: int,
    seed: int,
    video_episodes: int = 0,
    streams: dict[int, list] | None = None,
) -> list[EpisodeRequest]:
    """Episodes 0..episodes-1 of each task; with `streams` (from `openpi_streams`) each carries its reset's state
    of the task's random stream."""
    reqs = []
    for t in tasks:
        if episodes > t.num_eval_init_states:
            raise ValueError(
                f"task {t.task_id} has {t.num_eval_init_states} official init states, asked for {episodes}"
            )
        for k in range(episodes):
            rng = None if streams is None else streams[t.task_id][k]
            video = k < video_episodes
            reqs.append(EpisodeRequest(t.task_id, k, t.language, seed=seed, rng_state=rng, record_video=video))
    return reqs


def summarize(
    suite: str, tasks: list[TaskInfo], results: list[EpisodeResult], stats: RolloutStats, metric: TaskSuccessRate
) -> EvalResult:
    from pi0_lightning.envs.physics import stack_versions

    count_episodes(metric, results)
    # torchmetrics squeezes one-element results to scalars; keep per-task vectors 1-D
    out = {k: v.reshape(-1) for k, v in metric.compute().items()}
    res = EvalResult(
        suite,
        success_rate=float(out["overall"][0]),
        episodes=int(out["episodes"].sum()),
        env_errors=sum(not r.valid for r in results),
        stats=stats.as_dict(),
        stack=stack_versions() if suite in SUITE_MAX_STEPS else {},
    )
    for t in tasks:
        res.tasks.append(
            {
                "task_id": t.task_id,
                "name": t.name,
                "language": t.language,
                "episodes": int(out["episodes"][t.task_id]),
                "successes": int(out["successes"][t.task_id]),
                "success_rate": float(out["per_task"][t.task_id]),
            }
        )
    return res


def video_frame(frame: np.ndarray, prepared: bool = False) -> np.ndarray:
    """A recorded agentview frame as videos show it, the camera's view upright (robosuite's OpenCV convention): a raw
    render (OpenGL orientation, rows bottom-up) flipped vertically; an env-prepared one (`prepared`: rotated by 180
    degrees for the model as openpi does, i.e. also mirrored left-right, and resized) flipped horizontally."""
    return np.ascontiguousarray(frame[:, ::-1] if prepared else frame[::-1])


def write_videos(results: list[EpisodeResult], out: Path, fps: int = 10, prepared: bool = False) -> list[Path]:
    """One mp4 per episode that recorded frames, written directly into `out` (created if missing); `prepared`: the
    frames come from envs that prepared their images (`LiberoEnvConfig.image_size`), see `video_frame`."""
    import imageio.v2 as imageio

    paths = []
    for r in results:
        if not r.frames:
            continue
        path = out / f"task{r.request.task_id}_init{r.request.init_state}_{'ok' if r.success else 'fail'}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        frames = [video_frame(f, prepared) for f in r.frames]
        imageio.mimwrite(path, frames, fps=fps, macro_block_size=1)
        paths.append(path)
    return paths


def evaluate(
    policy: ChunkPolicy,
    pool,
    suite: str,
    tasks: list[TaskInfo],
    episodes: int,
    collector: CollectorConfig,
    seed: int = SEED,
    video_episodes: int = 0,
    progress_desc: str = "eval",
    openpi_seeding: bool = True,
) -> tuple[EvalResult, list[EpisodeResult]]:
    """openpi's protocol on the pool's workers; `openpi_seeding=False` seeds every episode's reset with `seed`
    instead of running each task's episodes from one stream (envs without fixture randomisation, e.g. reach)."""
    streams = openpi_streams(pool, [t.task_id for t in tasks], episodes, seed) if openpi_seeding else None
    requests = eval_requests(tasks, episodes, seed, video_episodes, streams)
    collector = replace(collector, retry_env_errors=False)
    results, stats = RolloutCollector(pool, policy, collector).collect(requests, desc=progress_desc)
    metric = TaskSuccessRate(num_tasks=max(t.task_id for t in tasks) + 1)
    return summarize(suite, tasks, results, stats, metric), results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pi0_lightning.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="pi0_lightning checkpoint directory (see pi0-convert)")
    p.add_argument(
        "--suite",
        default="libero_spatial",
        help="a LIBERO suite (libero_spatial, _object, _goal, _10, _90) or a LIBERO-PRO one",
    )
    p.add_argument("--tasks", default="all", help="task ids or names, comma-separated (default all)")
    p.add_argument("--episodes", type=int, default=50, help="episodes per task (official init states 0..N-1)")
    p.add_argument("--workers", type=int, default=2, help="environment subprocesses (~1.8 GB RAM each)")
    p.add_argument("--replan-steps", type=int, default=5)
    p.add_argument(
        "--pipeline-groups", type=int, default=2, help="env worker groups stepping while the policy serves another"
    )
    p.add_argument("--max-steps", type=int, help="policy steps per episode (default: the suite's)")
    p.add_argument("--num-steps-wait", type=int, default=NUM_STEPS_WAIT)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--video", type=int, default=0, help="record mp4s of the first N episodes of each task")
    p.add_argument("--out", default="runs/eval", help="output directory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: the checkpoint's")
    p.add_argument("--tokenizer", help="PaliGemma tokenizer file if the checkpoint bundles none")
    p.add_argument("--fast-tokenizer", help="PI0-FAST: FAST processor directory if the checkpoint bundles none")
    p.add_argument("--temperature", type=float, default=0.0, help="PI0-FAST decoding temperature (0 = greedy)")
    p.add_argument("--max-decoding-steps", type=int, default=256, help="PI0-FAST decoding budget per chunk")
    p.add_argument("--compile", action="store_true", help="on a GPU, torch.compile the transformer blocks (~20 s)")
    p.add_argument(
        "--no-cuda-graphs", dest="cuda_graphs", action="store_false", help="on a GPU, sample eagerly (slower)"
    )
    p.add_argument(
        "--train-small-tokenizer",
        action="store_true",
        help="for tiny test checkpoints without a tokenizer: train a small one on the suite's instructions",
    )
    p.add_argument("--worker-timeout", type=float, default=300.0, help="seconds before a hung worker is replaced")
    p.add_argument(
        "--allow-unverified-physics",
        action="store_true",
        help="run under a MuJoCo outside the verified range (numbers then differ from published ones)",
    )
    p.add_argument(
        "--guidance",
        type=float,
        help="CFG weight w for RL-trained checkpoints (default 1: the positive-conditioned policy; ignored otherwise)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from pi0_lightning.checkpoint import CheckpointError, read_config
    from pi0_lightning.envs.physics import PhysicsVersionError, check_mujoco
    from pi0_lightning.envs.pool import EnvPool
    from pi0_lightning.model.graphs import use_tf32
    from pi0_lightning.model.pi0_fast import PI0FASTConfig
    from pi0_lightning.model.speed import SpeedConfig
    from pi0_lightning.policy.assets import small_prompt_tokenizer
    from pi0_lightning.policy.loading import load_policy

    args = build_parser().parse_args(argv)
    use_tf32()
    out = Path(args.out)
    try:
        check_mujoco(args.allow_unverified_physics)
        tasks = resolve_tasks(args.suite, args.tasks)
        env_cfg = LiberoEnvConfig(
            suite=args.suite,
            max_steps=args.max_steps,
            num_steps_wait=args.num_steps_wait,
            seed=args.seed,
            allow_unverified_physics=args.allow_unverified_physics,
        )
        tokenizer = args.tokenizer
        if args.train_small_tokenizer and tokenizer is None:
            fast = isinstance(read_config(args.checkpoint), PI0FASTConfig)
            texts = [t.language for t in resolve_tasks(args.suite)]
            tokenizer = small_prompt_tokenizer(texts, out / "small_tokenizer.model", vocab_size=1000, fast=fast)
        # on a GPU; --no-cuda-graphs samples eagerly without stacked weights, the plain path to compare against
        speed = None
        if str(args.device).startswith("cuda"):
            speed = SpeedConfig(fused_projections=args.cuda_graphs, cuda_graphs=args.cuda_graphs, compile=args.compile)
        policy = load_policy(
            args.checkpoint,
            device=args.device,
            dtype=args.dtype,
            tokenizer=tokenizer,
            fast_tokenizer=args.fast_tokenizer,
            temperature=args.temperature,
            max_decoding_steps=args.max_decoding_steps,
            speed=speed,
        )
        # the workers rotate and resize the camera images to the model's input size (the policy then skips that)
        env_cfg = replace(env_cfg, image_size=policy.transforms.image_size)
        if getattr(policy.model, "cfg_embed", None) is not None:  # CFG-trained: sample a trained branch, never "none"
            policy.guidance = 1.0 if args.guidance is None else args.guidance
        eval_requests(tasks, args.episodes, args.seed)  # validate before starting workers
    except (UnknownTaskError, CheckpointError, FileNotFoundError, ValueError, PhysicsVersionError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    from functools import partial

    collector = CollectorConfig(
        replan_steps=args.replan_steps,
        max_steps=env_cfg.episode_steps,
        seed=args.seed,
        pipeline_groups=args.pipeline_groups,
    )
    with EnvPool(
        partial(LiberoEnv, env_cfg), min(args.workers, len(tasks) * args.episodes), timeout_s=args.worker_timeout
    ) as pool:
        result, episodes = evaluate(policy, pool, args.suite, tasks, args.episodes, collector, args.seed, args.video)
    out.mkdir(parents=True, exist_ok=True)
    payload = {**asdict(result), "checkpoint": str(Path(args.checkpoint).resolve()), "config": vars(args)}
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "results.md").write_text(result.markdown())
    video_dir = out / "videos"
    videos = write_videos(episodes, video_dir, prepared=env_cfg.image_size is not None)
    print(result.markdown())
    print(
        f"results: {out / 'results.md'}, {out / 'results.json'}"
        + (f", {len(videos)} videos in {video_dir}" if videos else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
