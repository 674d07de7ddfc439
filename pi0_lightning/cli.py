"""`pi0-lightning fit|validate --config ...`: LightningCLI over PI0RLModule and RolloutDataModule.

    pi0-lightning fit --config configs/demo.yaml
    pi0-lightning fit --config configs/experiments/base.yaml --config configs/experiments/libero_goal.yaml \
        --config configs/trainer/ddp.yaml
    pi0-lightning fit --config configs/demo.yaml --ckpt_path last        # resume (also what a requeued job runs)
    pi0-lightning validate --config configs/demo.yaml --ckpt_path runs/demo/checkpoints/last.ckpt
    pi0-lightning validate --config configs/demo.yaml --initial_weights true   # score model.checkpoint / random
    pi0-lightning fit --config configs/demo.yaml --print_config          # the fully resolved config

RL defaults are set here, not left to the user: one epoch is one RL iteration, so the train loader is rebuilt every
epoch; the loaders shard by rank themselves (no DistributedSampler); no sanity validation (it would be a full set
of evaluation rollouts).

Runs: a fresh `fit` starts a new MLflow run named `<run dir>-<suite>-<timestamp>`; `--ckpt_path` continues the run
that wrote the checkpoint (`last` = the newest complete resume point, damaged files skipped with a warning) and
`validate` logs into it at the checkpoint's step. Checkpoints are written atomically (`lit/checkpoints.py`) and a
preemption signal stops the run at once (`callbacks/preemption.py`).

Inputs are checked before anything is created (no output directory, no MLflow run, no env worker): a bad model
checkpoint, Lightning checkpoint, suite or task name, an unwritable output directory or tracking store gives one
line and exit code 2, as does a config error (its message first, then a hint to --help).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from pi0_lightning.lit.checkpoints import CheckpointInfo
from pi0_lightning.lit.datamodule import RolloutDataModule
from pi0_lightning.lit.module import PI0RLModule

TRAINER_DEFAULTS = {
    "reload_dataloaders_every_n_epochs": 1,
    "use_distributed_sampler": False,
    "num_sanity_val_steps": 0,
    "gradient_clip_val": 1.0,
    "log_every_n_steps": 1,
}
LIGHTNING_KEYWORDS = ("best", "hpc", "registry")
"""`--ckpt_path` values Lightning resolves itself."""


class InputError(Exception):
    """A user input that cannot work; reported in one line."""


def _say(message: str) -> None:
    print(f"pi0-lightning: {message}", file=sys.stderr)


class _Parser(LightningArgumentParser):
    def error(self, message: str, ex: Exception | None = None):
        # the message first: jsonargparse's default prints the whole usage (80+ lines) before it
        if not self.exit_on_error:
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        _say(f"error: {message.strip()}")
        print(f"(usage: {parser.prog.replace(' [options]', '')} --help)", file=sys.stderr)
        sys.exit(2)


class PI0LightningCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("subclass_mode_data", True)  # `data: {class_path: ...DemoDataModule, ...}` for SFT
        super().__init__(*args, parser_class=_Parser, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # RL configs give the data module's arguments alone
        parser.set_defaults({"data": {"class_path": "pi0_lightning.lit.datamodule.RolloutDataModule"}})
        parser.add_argument(
            "--initial_weights",
            type=bool,
            default=False,
            help="validate: score the initial weights (model.checkpoint, or random) instead of a Lightning "
            "checkpoint, in a new MLflow run",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        # before LightningCLI reads the checkpoint's hyperparameters: `last` becomes a file, a damaged one an error
        subcommand = self.config.get("subcommand")
        if subcommand:
            self._resumed = resolve_ckpt_path(self.config[subcommand], subcommand)

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        check_inputs(cfg, self.subcommand)
        fill_run_paths(cfg, getattr(self, "_resumed", None), self.subcommand)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        from lightning.fabric.plugins import CheckpointIO
        from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment

        from pi0_lightning.callbacks.preemption import Preemption
        from pi0_lightning.lit.checkpoints import AtomicCheckpointIO

        callbacks.append(Preemption())
        plugins = list(_entries(config.get("plugins")))
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        if SLURMEnvironment.detect() and not any(isinstance(p, ClusterEnvironment) for p in plugins):
            # Lightning's requeue saves a checkpoint mid-iteration; Preemption stops and requeues instead
            plugins.append(SLURMEnvironment(auto_requeue=False))
        config["plugins"] = plugins
        return super()._instantiate_trainer(config, callbacks)


def _entries(value) -> list:
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, list) else [value]


def _class_entries(cfg, key: str, suffix: str) -> list:
    return [
        e.init_args
        for e in _entries(getattr(cfg.trainer, key))
        if str(getattr(e, "class_path", "")).endswith(suffix) and getattr(e, "init_args", None) is not None
    ]


def _root(cfg) -> Path:
    return Path(cfg.trainer.default_root_dir or ".")


def _data(cfg):
    """The data module's arguments (`data:` holds a class_path and init_args: RolloutDataModule or DemoDataModule)."""
    return getattr(cfg.data, "init_args", cfg.data)


def _suite(cfg) -> str | None:
    env = _data(cfg).env
    if env is None:
        return "sft"
    return getattr(env, "suite", None) if getattr(env, "name", "libero") == "libero" else getattr(env, "name", None)


def checkpoint_dir(cfg) -> Path:
    """Where the run's Lightning checkpoints go: the first ModelCheckpoint's dirpath, else `<root>/checkpoints`."""
    for args in _class_entries(cfg, "callbacks", "ModelCheckpoint"):
        if args.dirpath:
            return Path(args.dirpath)
    return _root(cfg) / "checkpoints"


def tracking_uri(args) -> str:
    from pi0_lightning.lit.logger import default_tracking_uri

    return args.tracking_uri or default_tracking_uri(args.db, create=False)


def resolve_ckpt_path(cfg, subcommand: str | None) -> CheckpointInfo | None:
    """Turn `--ckpt_path` into a checked file (`last`: the newest complete resume point) and return its bookkeeping;
    None for a fresh run or a Lightning keyword."""
    from pi0_lightning.lit.checkpoints import CheckpointFileError, find_resume, read_checkpoint

    value = cfg.ckpt_path
    if subcommand == "validate" and value is None and not cfg.initial_weights:
        raise InputError(
            "validate needs --ckpt_path (a checkpoint of the run to evaluate); "
            "--initial_weights true evaluates the initial weights instead"
        )
    if value is None or value in LIGHTNING_KEYWORDS or str(value).startswith("registry:"):
        return None
    if value == "last":
        directory = checkpoint_dir(cfg)
        info, warnings = find_resume(directory)
        for line in warnings:
            _say(f"warning: {line}")
        if info is None:
            if subcommand == "validate" or warnings:  # never restart a run whose checkpoints are all damaged
                raise InputError(f"no complete checkpoint in {directory} to resume or validate")
            _say(f"no checkpoint in {directory}: starting a new run")
            cfg.ckpt_path = None
            return None
        if warnings:
            _say(f"resuming from {info.path}")
        cfg.ckpt_path = str(info.path)
        return info
    try:
        return read_checkpoint(value)
    except CheckpointFileError as e:
        raise InputError(str(e)) from None


def fill_run_paths(cfg, resumed: CheckpointInfo | None = None, subcommand: str | None = None) -> None:
    """Paths an experiment leaves out follow `trainer.default_root_dir` (our callbacks resolve theirs themselves):
    ModelCheckpoint's directory is `<root>/checkpoints` and an iteration checkpoint is written at the end of the
    iteration (not after validation only); the MLflow logger's local directory (where the resolved config.yaml goes)
    is the root, its experiment is named after the suite, and it continues the run of the checkpoint being resumed
    or validated, else starts one named `<run dir>-<suite>-<timestamp>`."""
    from pi0_lightning.lit.logger import timestamped_name

    root = _root(cfg)
    suite = _suite(cfg)
    for args in _class_entries(cfg, "callbacks", "ModelCheckpoint"):
        if args.dirpath is None:
            args.dirpath = str(root / "checkpoints")
        if args.save_on_train_epoch_end is None and args.monitor in (None, "step", "epoch"):
            args.save_on_train_epoch_end = True
    for args in _class_entries(cfg, "logger", "logger.MLflowLogger"):
        if args.experiment_name is None:
            args.experiment_name = suite or "pi0_lightning"
        if args.save_dir is None:
            args.save_dir = str(root)
        if args.run_id is None and resumed is not None and resumed.run_id:
            if resumed.tracking_uri == tracking_uri(args):
                args.run_id = resumed.run_id
            else:
                _say(f"warning: {resumed.path} was logged to {resumed.tracking_uri}; starting a new MLflow run")
        if args.run_id is None and args.run_name is None:
            tag = {"validate": "validate"}.get(subcommand or "")
            args.run_name = timestamped_name(root.resolve().name, suite, tag)


def check_checkpoint_assets(model_cfg, config) -> None:
    """The tokenizer, norm stats and (PI0-FAST) FAST processor a checkpoint needs, bundled or given."""
    from pi0_lightning.model.pi0_fast import PI0FASTConfig
    from pi0_lightning.policy.loading import checkpoint_assets

    fast = isinstance(config, PI0FASTConfig)
    try:
        checkpoint_assets(model_cfg.checkpoint, fast, model_cfg.tokenizer, model_cfg.fast_tokenizer)
    except FileNotFoundError as e:
        raise InputError(str(e)) from None


def _writable(path: Path) -> bool:
    """Whether `path` could be created or written: its nearest existing ancestor is a writable directory."""
    while not path.exists():
        if path.parent == path:
            return False
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def check_outputs(cfg, subcommand: str | None = None) -> None:
    """The run directory and a local MLflow store can be written (checked, not created), and a new `fit` does not
    write over another run's checkpoints."""
    root = _root(cfg)
    if root.exists() and not root.is_dir():
        raise InputError(f"trainer.default_root_dir {root} is a file, not a directory")
    if not _writable(root):
        raise InputError(f"trainer.default_root_dir {root} is not writable")
    ckpts = checkpoint_dir(cfg)
    if subcommand == "fit" and cfg.ckpt_path is None and ckpts.is_dir() and any(ckpts.glob("*.ckpt")):
        raise InputError(
            f"{ckpts} holds the checkpoints of an earlier run: resume it with --ckpt_path last, or give the new run "
            "its own trainer.default_root_dir"
        )
    for args in _class_entries(cfg, "logger", "logger.MLflowLogger"):
        uri = tracking_uri(args)
        if not uri.startswith("sqlite:///"):
            continue  # a tracking server answers for itself
        db = Path(uri.removeprefix("sqlite:///"))
        if db.exists() and not os.access(db, os.R_OK | os.W_OK):
            raise InputError(f"MLflow store {db} is not writable (unable to open database file)")
        if not _writable(db.parent):  # sqlite also writes a journal beside the database
            raise InputError(f"MLflow store {db}: directory {db.parent} is not writable")


def _plain(value) -> dict:
    return vars(value) if hasattr(value, "__dict__") else dict(value or {})


def check_dataset(data) -> None:
    """A demonstration dataset (`DemoDataModule`) opens and yields training episodes."""
    from dataclasses import fields

    from pi0_lightning.data.demos import DemoDataConfig, open_source, select_episodes
    from pi0_lightning.data.source import KeyMap

    # jsonargparse stores a field named like a Namespace method ("keys") behind a zero-width space
    raw = {k.lstrip("\u200b"): v for k, v in _plain(getattr(data, "dataset", None)).items()}
    known = {f.name for f in fields(DemoDataConfig)} - {"keys", "augment"}
    cfg = DemoDataConfig(**{k: v for k, v in raw.items() if k in known}, keys=KeyMap(**_plain(raw.get("keys"))))
    source = open_source(cfg)
    select_episodes(source, cfg.episodes_per_task, cfg.val_episodes_per_task, cfg.seed)


def check_inputs(cfg, subcommand: str | None = None) -> None:
    """Fail fast, before loggers, output directories or env workers exist, so a bad input leaves nothing behind."""
    from pi0_lightning.checkpoint import CheckpointError, check_weights, read_config
    from pi0_lightning.data.source import DatasetError
    from pi0_lightning.envs.libero import UnknownTaskError
    from pi0_lightning.envs.spec import EnvConfig, build_env_spec

    checkpoint = cfg.model.checkpoint
    data = _data(cfg)
    spec = None
    try:
        if checkpoint:
            check_checkpoint_assets(cfg.model, read_config(checkpoint))
            check_weights(checkpoint)
        if hasattr(data, "dataset"):
            check_dataset(data)
        if data.env is not None:
            spec = build_env_spec(EnvConfig(**_plain(data.env)))
    except (CheckpointError, DatasetError, UnknownTaskError, ValueError, ImportError) as e:
        raise InputError(str(e)) from None
    replan = data.replan_steps
    if spec is not None and (replan < 1 or replan > spec.max_steps):
        raise InputError(f"data.replan_steps must be in 1..{spec.max_steps}, got {replan}")
    check_outputs(cfg, subcommand)


def main(args: list[str] | None = None) -> int:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from pi0_lightning import signals
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
        _say(f"error: {e}")
        return 2
    except (signals.Preempted, SIGTERMException):
        signum = signals.stop_requested() or 15
        _say("stopped by a signal; resume with --ckpt_path last (the newest complete iteration)")
        return 128 + signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
