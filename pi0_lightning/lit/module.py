"""PI0RLModule: the Lightning side of post-training a PI0 / PI0.5 / PI0-FAST policy.

It builds the model (a converted checkpoint or a random variant), decides which parameters train, and hands the
rest to the algorithm object (`rl/algorithm.py`): the policy that collects rollouts, the loss of a training batch,
the settings validation sweeps. One epoch is one RL iteration: `RolloutDataModule` runs `rl/iteration.py` with
`policy()` before the epoch and serves its samples; `training_step` is the algorithm's loss with automatic
optimisation (AdamW, warmup + cosine, gradient clipping from the Trainer); validation batches arrive as finished
evaluation episodes and are counted into per-task success rates (torchmetrics, summed over ranks).

    pi0-lightning fit --config configs/demo.yaml
    pi0-lightning validate --config configs/demo.yaml --ckpt_path runs/demo/checkpoints/last.ckpt
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from pi0_lightning.checkpoint import export_pretrained, is_fast, load_or_init
from pi0_lightning.model.speed import SpeedConfig, apply_speed_paths, set_activation_checkpointing
from pi0_lightning.model.trainable import TrainableMode, set_trainable
from pi0_lightning.policy.loading import PolicyAssets, resolve_assets
from pi0_lightning.rl.algorithm import check_algorithm, default_algorithm
from pi0_lightning.rl.cfg import CFG
from pi0_lightning.rl.loop import LOOP
from pi0_lightning.rl.sft import SFT
from pi0_lightning.rollout.metrics import TaskSuccessRate, count_episodes


@dataclass
class OptimConfig:
    lr: float = 2.5e-5
    """Peak learning rate (openpi fine-tuning peak; RL usually wants the same or lower)."""
    weight_decay: float = 1e-10
    """openpi's AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 10
    """Linear warmup in optimizer steps."""
    decay_steps: int = 1000
    """Cosine decay length in optimizer steps, after warmup; then constant at min_lr."""
    min_lr: float = 2.5e-6


class PI0RLModule(L.LightningModule):
    def __init__(
        self,
        checkpoint: str | None = None,
        variant: str = "pi0_tiny",
        action_horizon: int | None = None,
        tokenizer: str | None = None,
        fast_tokenizer: str | None = None,
        algorithm: CFG | LOOP | SFT | None = None,
        optim: OptimConfig | None = None,
        trainable: TrainableMode = "full",
        lora_rank: int = 16,
        lora_alpha: float = 16.0,
        activation_checkpointing: bool = False,
        checkpoint_layers: int | None = None,
        model_dtype: Literal["float32", "bfloat16"] = "float32",
        cuda_graphs: bool = False,
        compile: bool = False,
        delta_actions: bool | None = None,
        seed: int = 0,
    ):
        """
        Args:
            checkpoint: a pi0_lightning checkpoint directory (see `pi0-convert`); None = random `variant` weights.
            variant: PI0Config or PI0FASTConfig variant for random initialisation (demos, tests, learning proofs).
            action_horizon: override the model's action horizon H (must be >= the data's replan_steps).
            tokenizer: PaliGemma tokenizer file if the checkpoint bundles none; random models train a small one.
            fast_tokenizer: PI0-FAST processor directory if the checkpoint bundles none; random models fit one.
            algorithm: `{name: cfg, ...}` (PI0 / PI0.5 default: `rl.cfg.CFG`), `{name: loop, ...}` (PI0-FAST
                default: `rl.loop.LOOP`) or `{name: sft, ...}` (`rl.sft.SFT`, with `DemoDataModule`): the loss, the
                rollout policy and the validation settings.
            optim: AdamW and the warmup + cosine schedule.
            trainable: full; action_expert (expert, projections, condition embedding); frozen_vision; lora.
            lora_rank: LoRA rank (trainable=lora).
            lora_alpha: LoRA alpha (trainable=lora).
            activation_checkpointing: recompute each JointLayer and SigLIP block in backward (less memory, more
                time; BENCHMARKS.md has the trade-off per layer count).
            checkpoint_layers: with activation_checkpointing, recompute only the first N JointLayers (SigLIP blocks
                always): memory for time, layer by layer.
            model_dtype: weights dtype; bfloat16 keeps openpi's float32 islands (norms, projections, embeddings).
            cuda_graphs: on CUDA, replay rollout sampling (PI0: the whole call; PI0-FAST: each decoding step) as CUDA
                graphs (one capture per batch size).
            compile: on CUDA (not FSDP), torch.compile every transformer block, for rollouts (inside the CUDA
                graphs) and training; about 20 s of compilation per new input shape.
            delta_actions: checkpoint trained with openpi's delta-action transform (default: pi0 and PI0-FAST yes,
                pi05 no; random models: the environment's default).
            seed: seed of random initialisation and of the loss's noise and time draws.
        """
        super().__init__()
        self.save_hyperparameters()
        self.fast = is_fast(checkpoint, variant)
        self.algorithm = algorithm or default_algorithm(self.fast)
        check_algorithm(self.algorithm, self.fast)
        self.optim = optim or OptimConfig()
        self.model: torch.nn.Module | None = None
        self.assets: PolicyAssets | None = None
        self._policy = None
        self.speed: SpeedConfig | None = None
        """The speed paths installed in `setup` (`model/speed.py`); None = the reference model as built."""
        self._generator = torch.Generator().manual_seed(seed)
        self.val_metrics: torch.nn.ModuleList | None = None
        self.val_episodes: list = []
        self.iterations_trained = 0
        """RL iterations whose training is in the current weights: what validation results and videos are labelled
        with (0 = the initial weights; `validate --ckpt_path` takes it from the checkpoint)."""
        self.validation_results: dict[str, Any] | None = None
        """The last rollout validation with its counts (summed over ranks): `iterations_trained` and per evaluation
        setting the success rate, episodes and successes, overall and per task (`callbacks.RolloutStatsWriter`)."""

    # ------------------------------------------------------------------ model and policy

    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        model = load_or_init(hp.checkpoint, hp.variant, hp.action_horizon, hp.seed)
        self.algorithm.prepare_model(model)
        model.apply_dtype_policy(hp.model_dtype)
        set_trainable(model, hp.trainable, hp.lora_rank, hp.lora_alpha)
        set_activation_checkpointing(model, hp.activation_checkpointing, hp.checkpoint_layers)
        self.model = model

    def setup(self, stage: str) -> None:
        from pi0_lightning.lit.strategies import uses_fsdp

        self.configure_model()
        hp = self.hparams
        trainer = self.trainer if self._trainer is not None else None
        # setup() runs before the model is moved: ask the strategy where it goes. Stacked weights and CUDA graphs
        # only outside FSDP (its gathered parameters are freed after each rollout); kernels only act on CUDA
        gpu = trainer is not None and trainer.strategy.root_device.type == "cuda" and not uses_fsdp(trainer)
        self.speed = SpeedConfig(
            fused_projections=gpu and hp.cuda_graphs,
            cuda_graphs=gpu and hp.cuda_graphs,
            compile=gpu and hp.compile,
            activation_checkpointing=hp.activation_checkpointing,
            checkpoint_layers=hp.checkpoint_layers,
        )
        apply_speed_paths(self.model, self.speed)
        dm = trainer.datamodule if trainer is not None else None
        spec = getattr(dm, "spec", None)
        demos = getattr(dm, "demos", None)  # a demonstration dataset (DemoDataModule)
        self.assets = resolve_assets(
            self.model,
            hp.checkpoint,
            hp.tokenizer,
            hp.fast_tokenizer,
            hp.delta_actions,
            instructions=(demos.instructions if demos else []) + ([t.language for t in spec.tasks] if spec else []),
            env_norm_stats=spec.default_norm_stats if spec else None,
            env_delta_actions=spec.delta_actions if spec else False,
            seed=hp.seed,
            data_norm_stats=demos.norm_stats if demos else None,
            data_chunks=demos.chunks if demos else None,
        )
        if spec is not None:
            n = max(t.task_id for t in spec.tasks) + 1
            self.val_metrics = torch.nn.ModuleList(TaskSuccessRate(n) for _ in self.algorithm.eval_settings())
            self.train_success = TaskSuccessRate(n)

    def policy(self, setting: float | None = None):
        """The current model as a chunk policy (same weights, no copy), built by the algorithm; `setting` is the CFG
        weight (PI0) or the decoding temperature (PI0-FAST), None = the training-rollout one."""
        if self._policy is None:
            self._policy = self.algorithm.build_policy(self.model, self.assets, self.device, self.speed)
        self._policy.device = self.device
        value = self.algorithm.rollout_setting() if setting is None else setting
        self.algorithm.configure_policy(self._policy, value)
        return self._policy

    # ------------------------------------------------------------------ training

    def on_train_epoch_start(self) -> None:
        self.iterations_trained = self.current_epoch
        self.log("iteration", float(self.current_epoch), batch_size=1)
        iteration = getattr(self.trainer.datamodule, "iteration", None)  # None: training on demonstrations
        if iteration is None:
            return
        for key, value in iteration.metrics.items():
            self.log(key, value, on_step=False, on_epoch=True, sync_dist=True, batch_size=1)
        valid = [e for e in iteration.episodes if e.valid]
        if valid:
            self.train_success.update(
                torch.tensor([e.request.task_id for e in valid]), torch.tensor([float(e.success) for e in valid])
            )
        per_task = self.train_success.compute()["per_task"].reshape(-1)  # collective: every rank calls it
        for t in self.trainer.datamodule.spec.tasks:
            self.log(f"rollout/success/task_{t.task_id}", per_task[t.task_id].nan_to_num(0.0), batch_size=1)
        self.train_success.reset()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        generator = self._generator if self.device.type == "cpu" else None
        loss, metrics = self.algorithm.loss(self.model, batch, generator)
        bs = batch["actions"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        for k, v in metrics.items():
            if k != "loss":
                self.log(f"train/{k}", v, batch_size=bs, sync_dist=True)
        return loss

    def configure_optimizers(self):
        o = self.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)

        def schedule(step: int) -> float:
            if step < o.warmup_steps:
                return (step + 1) / (o.warmup_steps + 1)
            progress = min(1.0, (step - o.warmup_steps) / max(1, o.decay_steps))
            floor = o.min_lr / o.lr
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ validation (finished evaluation episodes)

    def on_validation_epoch_start(self) -> None:
        self.val_episodes = []
        if self.trainer.state.fn == "fit":  # validation runs after the epoch's training
            self.iterations_trained = self.current_epoch + 1

    def validation_step(self, batch: list[list] | dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """`batch[i]`: the episodes of this batch's requests under evaluation setting i (`RolloutDataModule`); or a
        training batch of held-out demonstrations (`DemoDataModule`), whose loss is logged as val/loss."""
        if isinstance(batch, dict):
            generator = torch.Generator(self.device).manual_seed(batch_idx)  # the same noise and times every time
            loss, _ = self.algorithm.loss(self.model, batch, generator)
            bs = batch["actions"].shape[0]
            self.log("val/loss", loss, batch_size=bs, sync_dist=True, add_dataloader_idx=False)
            return
        for i, results in enumerate(batch):
            count_episodes(self.val_metrics[i], results)  # an episode that did not finish counts as a failure
            if i == 0:
                self.val_episodes += [r for r in results if r.frames and not r.request.pad]

    def on_validation_epoch_end(self) -> None:
        spec = getattr(self.trainer.datamodule, "spec", None)
        if spec is None or self.val_metrics is None:  # held-out loss only
            return
        tasks = spec.tasks
        settings = []
        for i, (suffix, value) in enumerate(self.algorithm.eval_settings()):
            out = self.val_metrics[i].compute()  # collective
            self.log(f"val/success_rate{suffix}", out["overall"].reshape(-1)[0].float(), batch_size=1)
            per_task = out["per_task"].reshape(-1)
            for t in tasks:
                rate = per_task[t.task_id].nan_to_num(0.0).float()
                self.log(f"val/success{suffix}/task_{t.task_id}", rate, batch_size=1)
            episodes, successes = out["episodes"].reshape(-1), out["successes"].reshape(-1)
            settings.append(
                {
                    "metric": f"val/success_rate{suffix}",
                    "value": value,
                    "success_rate": float(out["overall"]),
                    "episodes": int(episodes.sum()),
                    "successes": int(successes.sum()),
                    "per_task": {
                        t.task_id: {"episodes": int(episodes[t.task_id]), "successes": int(successes[t.task_id])}
                        for t in tasks
                    },
                }
            )
            self.val_metrics[i].reset()
        self.validation_results = {"iterations_trained": self.iterations_trained, "settings": settings}

    # ------------------------------------------------------------------ checkpoints and export

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the policy's assets travel with the weights: a tokenizer trained for a random model, the norm stats
        checkpoint["pi0_policy_assets"] = self.assets.to_checkpoint()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # checkpoints are written after an iteration's training (at its end, or when its validation ends)
        self.iterations_trained = checkpoint.get("epoch", -1) + 1
        saved = checkpoint.get("pi0_policy_assets")
        if saved and saved.get("tokenizer_bytes") is not None:
            # Lightning restores after setup(): replace what setup resolved, and rebuild the policy lazily
            self.assets = PolicyAssets.from_checkpoint(saved, self.assets.delta_actions)
            self._policy = None

    def export_pretrained(self, path: str | Path) -> Path:
        """The policy as a checkpoint directory (float32 safetensors, LoRA merged, assets bundled)."""
        hp = self.hparams
        lora = (hp.lora_rank, hp.lora_alpha) if hp.trainable == "lora" else None
        a = self.assets
        return export_pretrained(self.model, path, a.norm_stats, a.tokenizer, a.fast_tokenizer, lora, a.delta_actions)
