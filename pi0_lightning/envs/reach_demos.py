"""Demonstrations of the reach task as a LeRobot dataset: the data of the PI0-FAST learning proof's supervised stage.

    python -m pi0_lightning.envs.reach_demos --out runs/reach_demos [--episodes 400] [--expert-prob 0.15]

A deliberately mediocre demonstrator, so that RL has something to improve: every `hold` steps it picks an action,
with probability `expert_prob` the scripted expert's (straight to the target) and otherwise a random direction, and
holds it. Each step records both camera frames upright (the reach env renders upside down, like LIBERO), openpi's
8-d state and the executed action; the task instruction is the prompt. The dataset is written in openpi's LIBERO
layout (LeRobot v3.0, frames as PNG) with `norm_stats.json` set to the env's analytic stats (`reach_norm_stats`, the
ones RL uses), and `configs/sft/reach_fast.yaml` fine-tunes a tiny PI0-FAST on it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pi0_lightning.data.lerobot_writer import DemoEpisode, write_lerobot_dataset
from pi0_lightning.data.source import DatasetError
from pi0_lightning.envs.reach import ReachEnv, ReachEnvConfig, expert_action, reach_norm_stats, reach_tasks
from pi0_lightning.policy.transforms import libero_state, rotate_180


def demonstration(
    env: ReachEnv, task: int, init_state: int, rng: np.random.Generator, expert_prob: float, hold: int, seed: int
) -> tuple[DemoEpisode, bool]:
    obs, _ = env.reset(seed=seed, options={"task_id": task, "init_state": init_state})
    images, wrist, state, actions = [], [], [], []
    cfg = env.config
    action = np.zeros(7)
    for step in range(cfg.max_steps):
        if step % hold == 0:
            action = np.zeros(7)
            if rng.random() < expert_prob:
                action = expert_action(obs["eef_pos"], task, cfg)
            else:
                action[:2] = rng.uniform(-1.0, 1.0, 2)
        images.append(rotate_180(obs["agentview"]))
        wrist.append(rotate_180(obs["wrist"]))
        state.append(libero_state(obs["eef_pos"], obs["eef_quat"], obs["gripper_qpos"]))
        actions.append(action.astype(np.float32))
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            break
    episode = DemoEpisode(
        np.stack(images), np.stack(wrist), np.stack(state).astype(np.float32), np.stack(actions), env.language
    )
    return episode, bool(terminated)


def write_reach_demos(
    out: str | Path,
    episodes: int = 400,
    tasks: tuple[int, ...] = (0,),
    expert_prob: float = 0.15,
    hold: int = 5,
    seed: int = 0,
    config: ReachEnvConfig | None = None,
) -> tuple[Path, float]:
    """Write the dataset (and its norm_stats.json); returns its path and the demonstrations' success rate."""
    cfg = config or ReachEnvConfig()
    env = ReachEnv(cfg)
    rng = np.random.default_rng(seed)
    demos, successes = [], 0
    for ep in range(episodes):
        task = tasks[ep % len(tasks)]
        demo, success = demonstration(env, task, ep % cfg.num_init_states, rng, expert_prob, hold, seed + ep)
        demos.append(demo)
        successes += success
    env.close()
    root = write_lerobot_dataset(out, demos, fps=10, version="v3.0", image_storage="image")
    (root / "norm_stats.json").write_text(json.dumps(reach_norm_stats(cfg), indent=2) + "\n")
    return root, successes / episodes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pi0_lightning.envs.reach_demos", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/reach_demos", help="dataset directory to create")
    p.add_argument("--episodes", type=int, default=400)
    p.add_argument("--tasks", default="0", help="reach task ids, comma-separated")
    p.add_argument("--expert-prob", type=float, default=0.15)
    p.add_argument("--hold", type=int, default=5, help="steps each demonstrated action is held")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        tasks = tuple(int(x) for x in args.tasks.split(","))
        if not all(0 <= t < len(reach_tasks()) for t in tasks) or not 0 <= args.expert_prob <= 1 or args.hold < 1:
            raise ValueError("tasks must be reach task ids 0..3, --expert-prob in [0, 1], --hold >= 1")
        root, success = write_reach_demos(args.out, args.episodes, tasks, args.expert_prob, args.hold, args.seed)
    except (ValueError, DatasetError) as e:
        print(f"reach_demos: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {root} ({args.episodes} demonstrations, success rate {success:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
