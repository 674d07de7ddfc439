"""PI0RLModule: RIPT-style RL in Lightning for PI0 / PI0.5 (CFG advantage-conditioned flow matching) and PI0-FAST
(LOOP: RLOO + per-token PPO clipping).

One epoch is one RL iteration: `RolloutDataModule.train_dataloader()` collects K rollouts per context with the
current policy (guidance `rollout_guidance`, default w = 1: the positive-conditioned policy), keeps useful groups and
hands over one sample per executed chunk; `training_step` minimises the CFG loss (`rl/losses.py`) with automatic
optimisation (AdamW, warmup + cosine, gradient clipping from the Trainer). Validation runs the official evaluation
episodes for every guidance weight in `eval_guidance` and logs per-task success rates (torchmetrics, summed over
ranks). The trained policy samples with v = v_null + w * (v_pos - v_null), using the null condition it was trained
with.

PI0-FAST (a `pi0_fast*` variant or a PI0-FAST checkpoint) trains with `loss: {name: loop}`: rollouts decode at
`rollout_temperature` and record each token's log-probability; `training_step` recomputes them with gradients in
the decode layout (`PI0FAST.action_logp`) and minimises the clipped-ratio loss of `rl/loop.py`. `data.repeats` passes
over an iteration's chunks are the PPO epochs. Validation decodes at `eval_temperature` (openpi: greedy).

    pi0-lightning fit --config configs/demo.yaml
    pi0-lightning validate --config configs/demo.yaml --ckpt_path runs/demo/checkpoints/last.ckpt
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from pi0_lightning.model.config import PI0Config
from pi0_lightning.model.lora import apply_lora
from pi0_lightning.model.pi0 import PI0
from pi0_lightning.model.pi0_fast import FAST_VARIANTS, PI0FAST, PI0FASTConfig
from pi0_lightning.policy.assets import small_prompt_tokenizer, synthetic_fast_tokenizer
from pi0_lightning.policy.fast import FASTActionTokenizer
from pi0_lightning.policy.libero import LiberoPolicy
from pi0_lightning.policy.libero_fast import FAST_TOKENIZER_DIR, LiberoFASTPolicy
from pi0_lightning.policy.loading import checkpoint_assets
from pi0_lightning.rl.loop import LOOPLossConfig, loop_loss
from pi0_lightning.rl.losses import CFGLossConfig, cfg_loss
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
        loss: CFGLossConfig | LOOPLossConfig | None = None,
        optim: OptimConfig | None = None,
        trainable: Literal["full", "action_expert", "frozen_vision", "lora"] = "full",
        lora_rank: int = 16,
        lora_alpha: float = 16.0,
        activation_checkpointing: bool = False,
        checkpoint_layers: int | None = None,
        model_dtype: Literal["float32", "bfloat16"] = "float32",
        rollout_guidance: float = 1.0,
        eval_guidance: list[float] | None = None,
        num_denoise_steps: int = 10,
        cuda_graphs: bool = False,
        compile: bool = False,
        rollout_temperature: float = 1.0,
        eval_temperature: float = 0.0,
        max_decoding_steps: int = 256,
        delta_actions: bool | None = None,
        norm_mode: Literal["zscore", "quantile"] | None = None,
        seed: int = 0,
    ):
        """
        Args:
            checkpoint: a pi0_lightning checkpoint directory (see `pi0-convert`); None = random `variant` weights.
            variant: PI0Config or PI0FASTConfig variant for random initialisation (demos, tests, learning proofs).
            action_horizon: override the model's action horizon H (must be >= the data's replan_steps).
            tokenizer: PaliGemma tokenizer file if the checkpoint bundles none; random models train a small one.
            fast_tokenizer: PI0-FAST processor directory if the checkpoint bundles none; random models fit one.
            loss: `{name: cfg, ...}` (PI0 / PI0.5 default, two-branch) or `{name: loop, ...}` (PI0-FAST default).
            optim: AdamW and the warmup + cosine schedule.
            trainable: full; action_expert (expert, projections, condition embedding); frozen_vision; lora.
            lora_rank: LoRA rank (trainable=lora).
            lora_alpha: LoRA alpha (trainable=lora).
            activation_checkpointing: recompute each JointLayer and SigLIP block in backward (less memory, ~30% more
                time).
            checkpoint_layers: with activation_checkpointing, recompute only the first N JointLayers (SigLIP blocks
                always): memory for time, layer by layer (H100, B=16 full fine-tuning: all 541 ms / 25.3 GiB,
                N=10 490 ms / 33.5 GiB, none 404 ms / 60 GiB).
            model_dtype: weights dtype; bfloat16 keeps openpi's float32 islands (norms, projections, embeddings).
            rollout_guidance: CFG weight w used to collect training rollouts (1 = positive-conditioned policy).
            eval_guidance: CFG weights evaluated in validation; the first is logged as val/success_rate.
            num_denoise_steps: Euler steps of the flow sampler.
            cuda_graphs: on CUDA, replay rollout sampling (PI0: the whole call; PI0-FAST: each decoding step) as CUDA
                graphs (one capture per batch size).
            compile: on CUDA (not FSDP), torch.compile every transformer block: fused kernels for rollouts (inside
                the CUDA graphs) and training (H100, B=16 full fine-tuning step 728 -> 523 ms with checkpointing);
                about 20 s of compilation per new input shape.
            rollout_temperature: PI0-FAST sampling temperature of training rollouts (> 0; LOOP's pi_old).
            eval_temperature: PI0-FAST decoding temperature in validation (0 = greedy, as openpi).
            max_decoding_steps: PI0-FAST decoding budget per chunk (openpi: 256).
            delta_actions: checkpoint trained with openpi's delta-action transform (default: pi0 yes, pi05 no;
                random models: the environment's default).
            norm_mode: zscore (pi0) or quantile (pi05); default by model type.
            seed: seed of the loss's noise and time draws.
        """
        super().__init__()
        self.save_hyperparameters()
        self.checkpoint = checkpoint
        self.fast = _is_fast(checkpoint, variant)
        self.loss_config = loss or (LOOPLossConfig() if self.fast else CFGLossConfig())
        if self.fast != isinstance(self.loss_config, LOOPLossConfig):
            raise ValueError(
                "PI0-FAST trains with loss {name: loop}; PI0 / PI0.5 with loss {name: cfg}"
                f" (got {self.loss_config.name} for a {'PI0-FAST' if self.fast else 'PI0'} model)"
            )
        if self.fast and rollout_temperature <= 0:
            raise ValueError("LOOP needs stochastic rollouts: rollout_temperature must be > 0")
        self.optim = optim or OptimConfig()
        self.eval_guidance = list(eval_guidance) if eval_guidance else [1.0]
        self.model: PI0 | PI0FAST | None = None
        self.rollout_metrics: dict[str, float] = {}
        self._policy: LiberoPolicy | LiberoFASTPolicy | None = None
        self.fast_tokenizer: FASTActionTokenizer | None = None
        self._generator = torch.Generator().manual_seed(seed)
        self.tokenizer_path: Path | None = None
        self.norm_stats: dict | None = None
        self.val_metrics: torch.nn.ModuleList | None = None
        self.val_episodes: list = []

    # ------------------------------------------------------------------ model

    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        if self.checkpoint:
            from pi0_lightning.checkpoint import load_pretrained

            model = load_pretrained(self.checkpoint, dtype="float32")
        else:
            overrides = {"action_horizon": hp.action_horizon} if hp.action_horizon else {}
            with torch.random.fork_rng():
                torch.manual_seed(hp.seed)
                if self.fast:
                    model = PI0FAST(PI0FASTConfig.variant(hp.variant, **overrides))
                else:
                    model = PI0(PI0Config.variant(hp.variant, **overrides))
        if hp.action_horizon and model.config.action_horizon != hp.action_horizon:
            model.config.action_horizon = hp.action_horizon
        if not self.fast:
            model.add_cfg_conditions(self.loss_config.num_conditions)
        model.apply_dtype_policy(hp.model_dtype)
        self._set_trainable(model)
        layers = hp.checkpoint_layers if hp.checkpoint_layers is not None else True
        model.llm.gradient_checkpointing = layers if hp.activation_checkpointing else False
        model.vision.gradient_checkpointing = hp.activation_checkpointing
        self.model = model

    def _set_trainable(self, model: PI0 | PI0FAST) -> None:
        mode = self.hparams.trainable
        if mode == "action_expert" and self.fast:
            raise ValueError("PI0-FAST has no action expert; use trainable full, frozen_vision or lora")
        if mode == "lora":
            model.requires_grad_(False)
            apply_lora(model.llm, self.hparams.lora_rank, self.hparams.lora_alpha)
        elif mode in ("action_expert", "frozen_vision"):
            model.requires_grad_(True)
            model.vision.requires_grad_(False)
            if mode == "action_expert":
                model.llm.requires_grad_(False)
                for layer in model.llm.layers:
                    layer.experts[1].requires_grad_(True)
                model.llm.norms[1].requires_grad_(True)
        elif mode != "full":
            raise ValueError(f"trainable must be full, action_expert, frozen_vision or lora, got {mode!r}")
        if mode != "full":  # the heads that talk to the action space always train
            for name, module in model.named_children():
                if name not in ("vision", "llm"):
                    module.requires_grad_(True)

    def setup(self, stage: str) -> None:
        self.configure_model()
        if self.hparams.compile and self.trainer is not None:
            from lightning.pytorch.strategies import FSDPStrategy

            strategy = self.trainer.strategy  # setup() runs before the model is moved: ask the strategy
            if strategy.root_device.type == "cuda" and not isinstance(strategy, FSDPStrategy):
                from pi0_lightning.model.graphs import compile_blocks

                compile_blocks(self.model)
        dm = self.trainer.datamodule if self.trainer is not None else None
        self._resolve_policy_assets(dm)
        if dm is not None and dm.spec is not None:
            n = max(t.task_id for t in dm.spec.tasks) + 1
            self.num_tasks = n
            self.val_metrics = torch.nn.ModuleList(TaskSuccessRate(n) for _ in self.eval_settings())
            self.train_success = TaskSuccessRate(n)

    def _resolve_policy_assets(self, dm) -> None:
        """Tokenizer, norm stats, FAST processor: explicit, else the checkpoint's (`checkpoint_assets`), else (random
        models) built for the env.
        Resuming from a Lightning checkpoint replaces them with the ones saved in it (`on_load_checkpoint`)."""
        hp = self.hparams
        ckpt = Path(self.checkpoint) if self.checkpoint else None
        bundled = None
        if ckpt is not None:
            bundled = checkpoint_assets(ckpt, self.fast, hp.tokenizer, hp.fast_tokenizer, require_norm_stats=False)
        tok = bundled.tokenizer if bundled else hp.tokenizer
        if tok is None:
            instructions = [t.language for t in dm.spec.tasks] if dm is not None and dm.spec else []
            tmp = Path(tempfile.mkdtemp(prefix="pi0_tok_"))
            vocab = min(1000, self.model.config.vocab_size)
            tok = small_prompt_tokenizer(instructions, tmp / "small_tokenizer.model", vocab, fast=self.fast)
        self.tokenizer_path = Path(tok)
        if self.fast:
            fast_dir = bundled.fast_tokenizer if bundled else hp.fast_tokenizer
            if fast_dir is not None:
                self.fast_tokenizer = FASTActionTokenizer.from_pretrained(fast_dir)
            else:
                cfg = self.model.config
                self.fast_tokenizer = synthetic_fast_tokenizer(cfg.action_horizon, cfg.action_dim, seed=hp.seed)
        if bundled is not None and bundled.norm_stats is not None:
            import json

            self.norm_stats = json.loads(bundled.norm_stats.read_text())
        elif dm is not None and dm.spec is not None:
            self.norm_stats = dm.spec.default_norm_stats
        else:
            raise FileNotFoundError("no norm stats: the checkpoint has no norm_stats.json and no environment gives any")
        self.delta_actions = self._default_delta_actions(ckpt, dm)

    def _default_delta_actions(self, ckpt: Path | None, dm) -> bool:
        if self.hparams.delta_actions is not None:
            return self.hparams.delta_actions
        if ckpt is not None:
            return self.fast or not self.model.config.pi05
        return dm.spec.delta_actions if dm is not None and dm.spec is not None else False

    def _fsdp_root(self):
        from lightning.pytorch.strategies import FSDPStrategy

        trainer = self._trainer
        if trainer is not None and isinstance(trainer.strategy, FSDPStrategy):
            return trainer.strategy.model
        return None

    @contextlib.contextmanager
    def full_parameters(self) -> Iterator[None]:
        """Rollouts and export call the model outside `forward()`; under FSDP, gather the full parameters for them
        (a collective: every rank enters it). A no-op for other strategies."""
        root = self._fsdp_root()
        if root is None:
            yield
            return
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(root, writeback=False, recurse=True):
            yield

    def eval_settings(self) -> list[tuple[str, float]]:
        """(metric suffix, value) per validation pass: CFG weights w for PI0, the decoding temperature for FAST."""
        if self.fast:
            return [("", self.hparams.eval_temperature)]
        return [("" if i == 0 else f"_w{w:g}", w) for i, w in enumerate(self.eval_guidance)]

    def rollout_policy(self, setting: float | None = None) -> LiberoPolicy | LiberoFASTPolicy:
        """The current model as a LIBERO chunk policy (same weights; no copy). `setting` is the CFG weight (PI0) or
        the temperature (PI0-FAST); None = the training-rollout one."""
        hp = self.hparams
        if self._policy is None:
            # gathered FSDP parameters are freed after each rollout: captured graphs would point at freed memory
            graphs = hp.cuda_graphs and self.device.type == "cuda" and self._fsdp_root() is None
            if self.fast:
                self._policy = LiberoFASTPolicy.build(
                    self.model,
                    self.norm_stats,
                    self.tokenizer_path,
                    self.fast_tokenizer,
                    delta_actions=self.delta_actions,
                    max_decoding_steps=hp.max_decoding_steps,
                    device=self.device,
                    cuda_graphs=graphs,
                )
            else:
                self._policy = LiberoPolicy.build(
                    self.model,
                    self.norm_stats,
                    self.tokenizer_path,
                    delta_actions=self.delta_actions,
                    norm_mode=hp.norm_mode,
                    num_steps=hp.num_denoise_steps,
                    device=self.device,
                    cuda_graphs=graphs,
                )
        self._policy.device = self.device
        if self.fast:
            self._policy.temperature = hp.rollout_temperature if setting is None else setting
        else:
            self._policy.guidance = hp.rollout_guidance if setting is None else setting
        return self._policy

    # ------------------------------------------------------------------ training

    def on_train_epoch_start(self) -> None:
        for key, value in self.rollout_metrics.items():
            self.log(key, value, on_step=False, on_epoch=True, sync_dist=True, batch_size=1)
        dm = self.trainer.datamodule
        episodes = [e for e in getattr(dm, "last_episodes", []) if e.valid]
        if episodes:
            self.train_success.update(
                torch.tensor([e.request.task_id for e in episodes]), torch.tensor([float(e.success) for e in episodes])
            )
        out = self.train_success.compute()  # collective: every rank calls it
        per_task = out["per_task"].reshape(-1)
        for t in dm.spec.tasks:
            self.log(f"rollout/success/task_{t.task_id}", per_task[t.task_id].nan_to_num(0.0), batch_size=1)
        self.log("iteration", float(self.current_epoch), batch_size=1)
        self.train_success.reset()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.fast:
            logp = self.model.action_logp(
                batch["obs"],
                batch["tokens"],
                temperature=self.hparams.rollout_temperature,
                max_decoding_steps=self.hparams.max_decoding_steps,
            )
            loss, metrics = loop_loss(
                logp, batch["logp_old"], batch["advantages"], batch["token_mask"], batch["valid"], self.loss_config
            )
        else:
            loss, metrics = cfg_loss(
                self.model,
                batch["obs"],
                batch["actions"],
                batch["action_mask"],
                batch["advantages"],
                batch["valid"],
                self.loss_config,
                generator=self._generator if self.device.type == "cpu" else None,
            )
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

    # ------------------------------------------------------------------ validation (evaluation rollouts)

    def on_validation_epoch_start(self) -> None:
        self.val_episodes = []

    def validation_step(self, batch, batch_idx: int) -> None:
        dm = self.trainer.datamodule
        for i, (_, value) in enumerate(self.eval_settings()):
            policy = self.rollout_policy(value)
            seed = hash((dm.seed, 1_000_003, batch_idx, i)) & 0x7FFFFFFF
            collector = dm.collector(policy, seed, evaluation=True)
            # validation_step runs inside the (FSDP) root forward: the wrapped JointLayer / SiglipBlock units
            # gather their own parameters when called, so no manual gathering here (FSDP forbids it)
            results, _ = collector.collect(batch, desc=f"eval {'T' if self.fast else 'w'}={value:g}")
            count_episodes(self.val_metrics[i], results)  # an episode that did not finish counts as a failure
            if i == 0:
                self.val_episodes += [r for r in results if r.frames and not r.request.pad]

    def on_validation_epoch_end(self) -> None:
        tasks = self.trainer.datamodule.spec.tasks
        for i, (suffix, _) in enumerate(self.eval_settings()):
            out = self.val_metrics[i].compute()  # collective
            self.log(f"val/success_rate{suffix}", out["overall"].reshape(-1)[0].float(), batch_size=1)
            per_task = out["per_task"].reshape(-1)
            for t in tasks:
                self.log(
                    f"val/success{suffix}/task_{t.task_id}", per_task[t.task_id].nan_to_num(0.0).float(), batch_size=1
                )
            self.val_metrics[i].reset()

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the policy's assets travel with the weights: a tokenizer trained for a random model, and the norm stats
        checkpoint["pi0_policy_assets"] = {
            "tokenizer_name": self.tokenizer_path.name if self.tokenizer_path else None,
            "tokenizer_bytes": self.tokenizer_path.read_bytes() if self.tokenizer_path else None,
            "norm_stats": self.norm_stats,
            "fast_tokenizer": _fast_tokenizer_files(self.fast_tokenizer),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        assets = checkpoint.get("pi0_policy_assets")
        if not assets or assets.get("tokenizer_bytes") is None:
            return
        path = Path(tempfile.mkdtemp(prefix="pi0_tok_")) / assets["tokenizer_name"]
        path.write_bytes(assets["tokenizer_bytes"])
        if assets.get("fast_tokenizer"):
            fast_dir = path.parent / FAST_TOKENIZER_DIR
            fast_dir.mkdir()
            for name, data in assets["fast_tokenizer"].items():
                (fast_dir / name).write_bytes(data)
            self.fast_tokenizer = FASTActionTokenizer.from_pretrained(fast_dir)
        # Lightning restores after setup(): replace what setup resolved, and rebuild the policy lazily
        self.tokenizer_path, self.norm_stats = path, assets["norm_stats"]
        self._policy = None

    # ------------------------------------------------------------------ export

    def export_pretrained(self, path: str | Path) -> Path:
        """The policy as a pi0_lightning checkpoint directory (safetensors, float32, LoRA merged), loadable by PI0.

        Reads parameters by name, so it also works on FSDP-wrapped models inside `full_parameters()`.
        """
        import dataclasses

        from pi0_lightning.checkpoint import build_model
        from pi0_lightning.model.lora import merge_lora

        def clean(name: str) -> str:  # FSDP / activation-checkpoint wrappers insert these into parameter names
            return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")

        state = {clean(n): p.detach().to("cpu", torch.float32) for n, p in self.model.named_parameters()}
        model = build_model(dataclasses.replace(self.model.config, dtype="float32"))
        if self.hparams.trainable == "lora":
            apply_lora(model.llm, self.hparams.lora_rank, self.hparams.lora_alpha)
        model.load_state_dict(state, assign=True)
        merge_lora(model)
        model.apply_dtype_policy("float32")
        with tempfile.TemporaryDirectory() as tmp:
            assets = {}
            if self.fast_tokenizer is not None:
                assets[FAST_TOKENIZER_DIR] = self.fast_tokenizer.save_pretrained(Path(tmp) / FAST_TOKENIZER_DIR)
            model.save_pretrained(
                path, norm_stats=self.norm_stats, tokenizer_path=self.tokenizer_path, overwrite=True, asset_dirs=assets
            )
        return Path(path)


def _is_fast(checkpoint: str | None, variant: str) -> bool:
    if checkpoint:
        from pi0_lightning.checkpoint import read_config

        return isinstance(read_config(checkpoint), PI0FASTConfig)
    return variant in FAST_VARIANTS


def _fast_tokenizer_files(tokenizer: FASTActionTokenizer | None) -> dict[str, bytes] | None:
    if tokenizer is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        saved = tokenizer.save_pretrained(Path(tmp) / FAST_TOKENIZER_DIR)
        return {f.name: f.read_bytes() for f in saved.iterdir()}
