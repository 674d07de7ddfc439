"""Supervised warm start of a tiny PI0-FAST on the reach task: the starting point of the PI0-FAST learning proof.

    python -m pi0_lightning.warmstart --out runs/reach_fast_sft

A randomly initialised PI0-FAST never writes a well-formed `Action: <FAST tokens>|` answer, so every rollout gets
zero actions and RL has no signal (RIPT also starts from supervised checkpoints). This script makes a deliberately
mediocre policy to improve on: demonstrations where each chunk is, with probability `expert_prob`, the scripted
expert's action (straight to the target) and otherwise a random one, either held for the whole chunk; a FAST BPE
fitted on those chunks; openpi's supervised loss (`PI0FAST.forward`: cross-entropy on the postfix) for `steps`
AdamW steps; then the success rate of the result, greedy and sampled at temperature 1, on the env's init states.
The output is a normal checkpoint directory (weights, tokenizer, FAST processor, norm stats) for `model.checkpoint`.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from pi0_lightning.envs.pool import EnvPool
from pi0_lightning.envs.reach import ReachEnv, ReachEnvConfig, expert_action, reach_norm_stats, reach_tasks
from pi0_lightning.model.pi0_fast import PI0FAST, PI0FASTConfig
from pi0_lightning.policy.assets import small_prompt_tokenizer
from pi0_lightning.policy.fast_tokenizer import FASTActionTokenizer
from pi0_lightning.policy.pi0_fast_libero import FAST_TOKENIZER_DIR, LiberoFASTPolicy
from pi0_lightning.policy.pi0_libero import PolicyInput
from pi0_lightning.rollout.collector import CollectorConfig, RolloutCollector
from pi0_lightning.rollout.types import EpisodeRequest


@dataclass
class WarmStartConfig:
    tasks: tuple[int, ...] = (0,)
    episodes: int = 400
    """Demonstration episodes (init states cycled)."""
    expert_prob: float = 0.15
    """Probability that a demonstrated chunk is the expert's (else a held random direction)."""
    steps: int = 400
    batch_size: int = 32
    lr: float = 2e-3
    replan_steps: int = 5
    action_horizon: int = 10
    fast_vocab: int = 256
    seed: int = 0
    eval_episodes: int = 100
    workers: int = 8


def held_chunk(action: np.ndarray, horizon: int) -> np.ndarray:
    """One action held for the whole chunk: its FAST code is two DC coefficients and zeros (a few tokens)."""
    return np.repeat(np.asarray(action, dtype=np.float64)[None], horizon, axis=0)


def collect_demos(
    cfg: WarmStartConfig, env_cfg: ReachEnvConfig, prepare
) -> tuple[list[PolicyInput], np.ndarray, float]:
    """(policy inputs of each chunk start, normalised chunks (N, H, 7), demo success rate)."""
    rng = np.random.default_rng(cfg.seed)
    env = ReachEnv(env_cfg)
    tasks = {t.task_id: t.language for t in reach_tasks(env_cfg)}
    inputs, chunks, successes = [], [], 0
    for ep in range(cfg.episodes):
        task = cfg.tasks[ep % len(cfg.tasks)]
        obs, _ = env.reset(seed=cfg.seed + ep, options={"task_id": task, "init_state": ep % env_cfg.num_init_states})
        done = steps = 0
        while not done and steps < env_cfg.max_steps:
            action = np.zeros(7)
            if rng.random() < cfg.expert_prob:
                action = expert_action(obs["eef_pos"], task, env_cfg)
            else:
                action[:2] = rng.uniform(-1.0, 1.0, 2)
            chunk = held_chunk(action, cfg.action_horizon)
            inputs += prepare([obs], [tasks[task]])
            chunks.append(chunk)  # reach's quantile stats map [-1, 1] to itself: env actions are model actions
            for a in chunk[: cfg.replan_steps]:
                obs, _, terminated, truncated, _ = env.step(a)
                steps += 1
                if terminated or truncated or steps >= env_cfg.max_steps:
                    done, successes = True, successes + int(terminated)
                    break
    env.close()
    return inputs, np.stack(chunks).astype(np.float32), successes / cfg.episodes


def success_rate(policy: LiberoFASTPolicy, cfg: WarmStartConfig, env_cfg: ReachEnvConfig, temperature: float) -> float:
    tasks = {t.task_id: t.language for t in reach_tasks(env_cfg)}
    requests = [
        EpisodeRequest(t, k % env_cfg.num_init_states, tasks[t], seed=k)
        for k in range(cfg.eval_episodes)
        for t in cfg.tasks
    ]
    policy.temperature = temperature
    collector_cfg = CollectorConfig(cfg.replan_steps, env_cfg.max_steps, seed=cfg.seed, progress=False)
    with EnvPool(partial(ReachEnv, env_cfg), cfg.workers) as pool:
        results, _ = RolloutCollector(pool, policy, collector_cfg).collect(requests)
    return float(np.mean([r.success for r in results]))


def warm_start(cfg: WarmStartConfig, out: Path) -> dict[str, float]:
    torch.manual_seed(cfg.seed)
    env_cfg = ReachEnvConfig()
    model = PI0FAST(PI0FASTConfig.variant("pi0_fast_micro", action_horizon=cfg.action_horizon))
    norm_stats = reach_norm_stats(env_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        instructions = [t.language for t in reach_tasks(env_cfg)]
        tok_file = small_prompt_tokenizer(instructions, tmp / "small_tokenizer.model", 1000, fast=True)
        # a placeholder processor to prepare observations; the real one is fitted on the demonstrations below
        probe = FASTActionTokenizer.fit(np.zeros((4, cfg.action_horizon, 7)), vocab_size=cfg.fast_vocab)
        policy = LiberoFASTPolicy.build(model, norm_stats, tok_file, probe, delta_actions=False, max_decoding_steps=64)
        inputs, chunks, demo_success = collect_demos(cfg, env_cfg, policy.prepare)
        policy.action_tokenizer = FASTActionTokenizer.fit(chunks, vocab_size=cfg.fast_vocab)
        lengths = [len(policy.action_tokenizer.encode(c)) for c in chunks]
        print(
            f"{len(chunks)} demonstrated chunks; FAST tokens per chunk: mean {np.mean(lengths):.1f}, max {max(lengths)}"
        )  # noqa: E501
        policy.max_decoding_steps = max(lengths) + 16

        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-10)
        rng = np.random.default_rng(cfg.seed)
        model.train()
        for step in range(cfg.steps):
            idx = rng.choice(len(chunks), cfg.batch_size, replace=len(chunks) < cfg.batch_size)
            obs = policy.training_observation([inputs[i] for i in idx], chunks[idx])
            loss = model(obs).mean()
            for group in opt.param_groups:  # cosine decay to a tenth
                group["lr"] = cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / cfg.steps)))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % 100 == 0 or step == cfg.steps - 1:
                print(f"supervised step {step}: loss {loss.item():.3f}", flush=True)
        model.eval()
        result = {
            "demo_success": demo_success,
            "greedy_success": success_rate(policy, cfg, env_cfg, 0.0),
            "sampled_success": success_rate(policy, cfg, env_cfg, 1.0),
        }
        fast_dir = policy.action_tokenizer.save_pretrained(tmp / FAST_TOKENIZER_DIR)
        model.save_pretrained(
            out,
            norm_stats=norm_stats,
            tokenizer_path=tok_file,
            overwrite=True,
            asset_dirs={FAST_TOKENIZER_DIR: fast_dir},
            metadata={"warm_start": {**vars(cfg), **result}},
        )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pi0_lightning.warmstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/reach_fast_sft", help="checkpoint directory to write")
    defaults = WarmStartConfig()
    for name in ("episodes", "steps", "batch_size", "seed", "eval_episodes", "workers", "fast_vocab"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    p.add_argument("--expert-prob", type=float, default=defaults.expert_prob)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--tasks", default="0", help="reach task ids, comma-separated")
    args = p.parse_args(argv)
    try:
        tasks = tuple(int(x) for x in args.tasks.split(","))
        if not all(0 <= t < 4 for t in tasks) or not 0 <= args.expert_prob <= 1:
            raise ValueError("tasks must be reach task ids 0..3 and --expert-prob in [0, 1]")
    except ValueError as e:
        print(f"warmstart: error: {e}", file=sys.stderr)
        return 2
    fields = {k: v for k, v in vars(args).items() if k not in ("out", "tasks")}
    result = warm_start(WarmStartConfig(tasks=tasks, **fields), Path(args.out))
    print("| demonstrations | greedy | temperature 1 |\n|---|---|---|")
    print(f"| {result['demo_success']:.3f} | {result['greedy_success']:.3f} | {result['sampled_success']:.3f} |")
    print(f"checkpoint: {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
