"""`pi0-lightning fit|validate --config ...`: LightningCLI over PI0RLModule and RolloutDataModule.

    pi0-lightning fit --config configs/demo.yaml
    pi0-lightning fit --config configs/experiments/base.yaml --config configs/experiments/libero_goal.yaml \
        --config configs/trainer/ddp.yaml
    pi0-lightning fit --config configs/demo.yaml --ckpt_path last        # resume
    pi0-lightning validate --config configs/demo.yaml --ckpt_path runs/demo/checkpoints/last.ckpt
    pi0-lightning fit --config configs/demo.yaml --print_config          # the fully resolved config

RL defaults are set here, not left to the user: one epoch is one RL iteration, so the train loader is rebuilt every
epoch; the loaders shard by rank themselves (no DistributedSampler); no sanity validation (it would be a full set
of evaluation rollouts). Inputs are checked before anything is created: a bad checkpoint, suite or task name gives
one line and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from pi0_lightning.lit.datamodule import RolloutDataModule
from pi0_lightning.lit.module import PI0RLModule

TRAINER_DEFAULTS = {
    "reload_dataloaders_every_n_epochs": 1,
    "use_distributed_sampler": False,
    "num_sanity_val_steps": 0,
    "gradient_clip_val": 1.0,
    "log_every_n_steps": 1,
}


class InputError(Exception):
    """A user input that cannot work; reported in one line."""


class PI0LightningCLI(LightningCLI):
    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        check_inputs(cfg)
        fill_run_paths(cfg)


def _entries(value) -> list:
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, list) else [value]


def fill_run_paths(cfg) -> None:
    """Paths an experiment leaves out follow `trainer.default_root_dir` (our callbacks resolve theirs themselves):
    ModelCheckpoint's directory is `<root>/checkpoints`; the MLflow logger's run file sits beside it, its local
    directory (where the resolved config.yaml goes) is the root, and its experiment is named after the suite."""
    root = Path(cfg.trainer.default_root_dir or ".")
    env = cfg.data.env
    suite = getattr(env, "suite", None) if getattr(env, "name", "libero") == "libero" else getattr(env, "name", None)
    for entry in _entries(cfg.trainer.callbacks):
        args = getattr(entry, "init_args", None)
        if str(getattr(entry, "class_path", "")).endswith("ModelCheckpoint") and args.dirpath is None:
            args.dirpath = str(root / "checkpoints")
    for entry in _entries(cfg.trainer.logger):
        args = getattr(entry, "init_args", None)
        if str(getattr(entry, "class_path", "")).endswith("logger.MLflowLogger"):
            if args.run_file is None:
                args.run_file = str(root / "checkpoints" / "mlflow_run.json")
            if args.experiment_name is None:
                args.experiment_name = suite or "pi0_lightning"
            if args.save_dir is None:
                args.save_dir = str(root)


def check_checkpoint_assets(model_cfg, config) -> None:
    """The tokenizer, norm stats and (PI0-FAST) FAST processor a checkpoint needs, bundled or given."""
    from pi0_lightning.model.pi0_fast import PI0FASTConfig
    from pi0_lightning.policy.loading import checkpoint_assets

    fast = isinstance(config, PI0FASTConfig)
    try:
        checkpoint_assets(model_cfg.checkpoint, fast, model_cfg.tokenizer, model_cfg.fast_tokenizer)
    except FileNotFoundError as e:
        raise InputError(str(e)) from None


def check_inputs(cfg) -> None:
    """Fail fast, before loggers or env workers exist, so a bad input leaves nothing behind."""
    from pi0_lightning.checkpoint import CheckpointError, read_config
    from pi0_lightning.envs.libero import UnknownTaskError
    from pi0_lightning.envs.spec import EnvConfig, build_env_spec

    checkpoint = cfg.model.checkpoint
    try:
        if checkpoint:
            check_checkpoint_assets(cfg.model, read_config(checkpoint))
        env = cfg.data.env
        env_cfg = EnvConfig(**(vars(env) if hasattr(env, "__dict__") else dict(env or {})))
        spec = build_env_spec(env_cfg)
    except (CheckpointError, UnknownTaskError, ValueError, ImportError) as e:
        raise InputError(str(e)) from None
    replan = cfg.data.replan_steps
    if replan < 1 or replan > spec.max_steps:
        raise InputError(f"data.replan_steps must be in 1..{spec.max_steps}, got {replan}")


def main(args: list[str] | None = None) -> int:
    from pi0_lightning.model.graphs import use_tf32

    use_tf32()
    try:
        PI0LightningCLI(
            PI0RLModule,
            RolloutDataModule,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            parser_kwargs={"default_env": True},
            args=args,
        )
    except InputError as e:
        print(f"pi0-lightning: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
