"""Where an RL iteration's time and memory go: `Trainer.fit` of an experiment config for a few iterations per
trainable mode, each in a fresh process, with one table row per iteration.

    python -m pi0_lightning.benchmarks.iteration [--config configs/experiments/base.yaml] \
        [--modes full action_expert lora] [--iterations 2] [--workers 8] [--eval-episodes 2] [--out runs/bench_it]
    python -m pi0_lightning.benchmarks.iteration --variant pi0_tiny --accelerator cpu --workers 2 --iterations 2 \
        --eval-episodes 1 --modes full -- --data.sampling.group_size 2 --data.sampling.contexts_per_round 1 \
        --data.sampling.groups_per_rank 1 --data.env.tasks 0 --data.env.max_steps 10  # smoke (CPU)

Arguments after `--` go to every `pi0-lightning fit` as overrides.

Each mode runs the config as a user would (its sampling, batch, passes, checkpoint callback, CUDA graphs and
compilation), with these changes: random weights of `--variant` (no checkpoint is needed; speed does not depend on
the weights), no MLflow logger and no videos, one validation in the last iteration with `--eval-episodes` per task
at the config's guidance values, the best-checkpoint callback dropped (it needs a validation metric), the
per-iteration checkpoint keeping only the newest one and no `last.ckpt` copy (full fine-tuning of PI0 writes ~20 GB
per checkpoint), and no safetensors export at the end. Dynamic
sampling is off: random weights never succeed, so no group would be useful and an iteration would run all its rounds
to train on nothing; with it off, every collected group trains, as in an iteration whose groups are all useful.

The rows come from the run's `timing.jsonl` (`callbacks.RolloutStatsWriter`): rollout wall seconds with the main
process's wait for env workers, its policy time and the workers' summed reset time; training; validation; "between"
(the gap before an iteration's epoch other than its rollout: the previous iteration's checkpoint, loader setup);
peak GPU memory during the iteration.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from pi0_lightning.benchmarks import write_json
from pi0_lightning.learning_curve import read_jsonl, timing_table

MODES = ("full", "action_expert", "lora")


def mode_config(base: dict, mode: str, args: argparse.Namespace, root: Path) -> dict:
    """The config of one mode's run: `base` with the changes the module docstring lists."""
    config = copy.deepcopy(base)
    trainer, model, data = (
        config.setdefault("trainer", {}),
        config.setdefault("model", {}),
        config.setdefault("data", {}),
    )
    trainer.update(
        max_epochs=args.iterations,
        check_val_every_n_epoch=args.iterations,
        default_root_dir=str(root / mode),
        logger=False,
        accelerator=args.accelerator,
    )
    callbacks = []
    for cb in trainer.get("callbacks", []):
        name, init = cb["class_path"], dict(cb.get("init_args", {}))
        if name.endswith("ModelCheckpoint"):
            if init.get("monitor", "step") != "step":
                continue
            init.update(save_top_k=1, save_last=False)
        if name.endswith(("RolloutVideoLogger", "RolloutStatsWriter", "SafetensorsExport")):
            continue
        callbacks.append({"class_path": name, "init_args": init} if init else {"class_path": name})
    trainer["callbacks"] = [*callbacks, {"class_path": "pi0_lightning.callbacks.RolloutStatsWriter"}]
    model.update(checkpoint=None, variant=args.variant, trainable=mode)
    if args.accelerator == "cpu":
        model.update(cuda_graphs=False, compile=False, model_dtype="float32")
    data.setdefault("env", {})["num_workers"] = args.workers
    data.setdefault("sampling", {})["dynamic_sampling"] = False
    data.update(eval_episodes=args.eval_episodes, video_episodes=0)
    return config


def run_mode(base: dict, mode: str, args: argparse.Namespace, root: Path) -> dict:
    config = mode_config(base, mode, args, root)
    path = Path(tempfile.mkdtemp(prefix="bench_iteration_")) / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"--- {mode}: pi0-lightning fit --config {path} {' '.join(args.overrides)}", flush=True)
    command = [sys.executable, "-m", "pi0_lightning.cli", "fit", "--config", str(path), *args.overrides]
    proc = subprocess.run(command, env=os.environ)
    run = root / mode
    return {
        "mode": mode,
        "returncode": proc.returncode,
        "timing": read_jsonl(run / "timing.jsonl"),
        "rollouts": read_jsonl(run / "rollout_stats.jsonl"),
        "validations": read_jsonl(run / "validation.jsonl"),
    }


def report(results: list[dict]) -> None:
    for r in results:
        print(f"\n### trainable = {r['mode']} (exit code {r['returncode']})\n")
        if r["timing"]:
            print("\n".join(timing_table(r["timing"])))
        for s in r["rollouts"]:
            print(f"iteration {s['iteration']}: {s.get('rollout/episodes', 0):.0f} episodes, "
                  f"{s['rollout/env_steps_per_s']:.1f} env steps/s, policy {s['rollout/policy_ms_per_call']:.0f} "
                  f"ms/call, {s['rollout/train_chunks']:.0f} training chunks")  # fmt: skip
        for v in r["validations"]:
            episodes = sum(st["episodes"] for st in v["settings"])
            print(f"validation: {len(v['settings'])} guidance values, {episodes} episodes, {v.get('seconds', 0):.1f} s")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=Path("configs/experiments/base.yaml"))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--variant", default="pi0", help="PI0 variant with random weights (pi0: full size)")
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--workers", type=int, default=8, help="env workers (the config's data.env.num_workers)")
    p.add_argument("--eval-episodes", type=int, default=2, help="validation episodes per task (last iteration)")
    p.add_argument("--accelerator", default="gpu")
    p.add_argument("--root", type=Path, default=Path("runs/bench_iteration"), help="the runs' directories")
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])
    args.overrides = argv[split + 1 :]
    problem = None if args.config.is_file() else f"config {args.config} not found"
    if args.iterations < 1:
        problem = "--iterations must be at least 1"
    if problem:
        print(f"iteration benchmark: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    base = yaml.safe_load(args.config.read_text())
    results = [run_mode(base, mode, args, args.root) for mode in args.modes]
    report(results)
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
