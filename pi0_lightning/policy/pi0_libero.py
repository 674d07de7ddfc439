"""PI0 as a LIBERO chunk policy: env observations -> openpi's transforms -> batched `sample_actions` -> env actions.

Runs in the main process only (environment workers never see the model). `prepare` turns env observations into
compact per-observation inputs (224x224 uint8 camera images after openpi's 180-degree rotation and resize, the raw
8-dim state, the tokenised prompt); these are what each executed chunk stores for training, so the RL loss sees
exactly what the policy saw. Observations marked with `transforms.PREPARED_IMAGES_KEY` arrive with their images
already rotated and resized by the env worker (`LiberoEnvConfig.image_size`, the same function on the same render):
`prepare` checks their size against the model's and keeps them as they are, giving the same bytes as from raw
renders. `act` batches them into a model `Observation`, samples with per-row seeded noise (row k's
noise depends only on its own seed, not on the rest of the batch), and returns both the normalised model-space
actions (the RL targets) and the env actions (unnormalised, delta -> absolute).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from pi0_lightning.model.observation import Observation
from pi0_lightning.model.pi0 import PI0
from pi0_lightning.model.speed import SpeedConfig, apply_speed_paths
from pi0_lightning.policy.tokenizer import PromptTokenizer
from pi0_lightning.policy.transforms import (
    PREPARED_IMAGES_KEY,
    LiberoTransforms,
    Normalizer,
    libero_state,
    thread_map,
)


@dataclass
class PolicyInput:
    """One observation as the policy consumed it."""

    agentview: np.ndarray  # (224, 224, 3) uint8, rotated and resized (by the policy or the env)
    wrist: np.ndarray  # (224, 224, 3) uint8
    raw_state: np.ndarray  # (8,) float32: eef pos, axis-angle, gripper qpos
    tokens: np.ndarray  # (L,) int64
    token_mask: np.ndarray  # (L,) bool


def observation_inputs(transforms: LiberoTransforms, obs: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """(agentview, wrist, raw state) of one env observation as the policies store them: rotated, resized uint8
    images (raw renders are prepared here; an observation marked with `PREPARED_IMAGES_KEY` brings them so, and its
    size is checked) and the raw 8-dim state."""
    prepared = bool(obs.get(PREPARED_IMAGES_KEY, False))
    agent, wrist = transforms.camera_images(obs["agentview"], obs["wrist"], prepared=prepared)
    return agent, wrist, libero_state(obs["eef_pos"], obs["eef_quat"], obs["gripper_qpos"])


def batch_observation_inputs(
    transforms: LiberoTransforms, observations: list[dict[str, np.ndarray]]
) -> list[tuple[np.ndarray, ...]]:
    """`observation_inputs` of a whole batch, on threads (see `transforms.thread_map`)."""
    return thread_map(partial(observation_inputs, transforms), observations)


def row_noise(seeds: Sequence[int], shape: tuple[int, ...], batch: int) -> torch.Tensor:
    """(batch, *shape) standard normal noise, row k from a CPU generator seeded with `seeds[k]`."""
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for {batch} inputs")
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


class LiberoInputs:
    """What the PI0 and PI0-FAST LIBERO policies share: env observations -> the stored `PolicyInput`s -> the model's
    `Observation`. A policy says how a prompt (and the chunk-start state) becomes tokens (`prompt_tokens`) and which
    extra `Observation` fields its model reads (`extra_fields`)."""

    transforms: LiberoTransforms
    device: torch.device
    drop_masked_cameras: bool = False

    def prompt_tokens(self, prompt: str, raw_state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def extra_fields(self, tokens: torch.Tensor) -> dict:
        return {}

    def prepare(self, observations: list[dict[str, np.ndarray]], prompts: list[str]) -> list[PolicyInput]:
        inputs = batch_observation_inputs(self.transforms, observations)
        return [
            PolicyInput(agent, wrist, state, *self.prompt_tokens(prompt, state))
            for (agent, wrist, state), prompt in zip(inputs, prompts, strict=True)
        ]

    def inputs_only(self) -> LiberoInputs:
        """A copy without the model: what a DataLoader worker needs to turn demonstrations into model inputs."""
        twin = copy.copy(self)
        for name in ("model", "graphs", "decoder"):
            if hasattr(twin, name):
                setattr(twin, name, None)
        twin.device = torch.device("cpu")
        return twin

    def supervised_observation(self, inputs: list[PolicyInput], chunks: np.ndarray) -> Observation:
        """The model's training inputs for demonstrated normalised `chunks` (B, H, D), on the CPU. PI0 reads the
        actions separately; PI0-FAST (`LiberoFASTPolicy`) encodes them into the token sequence."""
        return self.to_observation(inputs, device="cpu")

    def to_observation(self, inputs: list[PolicyInput], device: str | torch.device | None = None) -> Observation:
        raw = np.stack([x.raw_state for x in inputs])
        model_in = self.transforms.inputs([(x.agentview, x.wrist) for x in inputs], raw)
        keep = [k for k, m in model_in["image_masks"].items() if m.any() or not self.drop_masked_cameras]
        tokens = torch.from_numpy(np.stack([x.tokens for x in inputs])).long()
        return Observation(
            images={k: model_in["images"][k] for k in keep},
            image_masks={k: model_in["image_masks"][k] for k in keep},
            state=model_in["state"],
            tokenized_prompt=tokens,
            tokenized_prompt_mask=torch.from_numpy(np.stack([x.token_mask for x in inputs])),
            **self.extra_fields(tokens),
        ).to(device if device is not None else self.device)


class LiberoPolicy(LiberoInputs):
    def __init__(
        self,
        model: PI0,
        tokenizer: PromptTokenizer,
        transforms: LiberoTransforms,
        num_steps: int = 10,
        device: str | torch.device = "cpu",
        drop_masked_cameras: bool = True,
        speed: SpeedConfig | None = None,
    ):
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} ids but the model embeds only {model.config.vocab_size}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.transforms = transforms
        self.num_steps = num_steps
        self.device = torch.device(device)
        # a camera masked in every row (LIBERO's absent right wrist) contributes nothing: its tokens are excluded from
        # attention and do not move positions, so leaving it out gives the same outputs for a third less compute
        self.drop_masked_cameras = drop_masked_cameras
        # `speed` (None: the model as it is): CUDA-graph replay of sample_actions is ~5x faster at small batch on an
        # H100 (one capture per batch size), compiled blocks inside it another 1.4-1.5x (~20 s compile per shape)
        self.graphs = apply_speed_paths(model, speed) if speed is not None else None
        self.action_horizon = model.config.action_horizon
        self._prompt_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def build(
        cls,
        model: PI0,
        norm_stats: str | Path | dict,
        tokenizer_file: str | Path,
        delta_actions: bool | None = None,
        norm_mode: str | None = None,
        **kwargs,
    ) -> LiberoPolicy:
        """The policy for `model` with openpi's LIBERO defaults: PI0 z-score + delta actions (`pi0_libero`), PI0.5
        quantile + absolute actions (`pi05_libero`). `norm_stats` is a norm_stats.json path or its parsed dict."""
        pi05 = model.config.pi05
        transforms = LiberoTransforms(
            normalizer=Normalizer.from_json(norm_stats, mode=norm_mode or ("quantile" if pi05 else "zscore")),
            model_action_dim=model.config.action_dim,
            delta_actions=(not pi05) if delta_actions is None else delta_actions,
            image_size=model.config.vision.image_size,
        )
        tok = PromptTokenizer.from_file(tokenizer_file, max_len=model.config.max_token_len)
        return cls(model, tok, transforms, **kwargs)

    def prompt_tokens(self, prompt: str, raw_state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if prompt not in self._prompt_cache:
            self._prompt_cache[prompt] = self.tokenizer.encode(prompt)
        return self._prompt_cache[prompt]

    guidance: float | None = None
    """CFG weight w (None: plain sampling; needs a model trained with CFG conditions otherwise)."""

    def sample(self, obs: Observation, noise: torch.Tensor) -> torch.Tensor:
        """Model-space action chunks."""
        if self.graphs is not None:
            return self.graphs(obs, noise, self.num_steps, self.guidance)
        return self.model.sample_actions(obs, noise=noise, num_steps=self.num_steps, guidance=self.guidance)

    @torch.no_grad()
    def act(self, inputs: list[PolicyInput], seeds: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Row k's flow-matching noise comes from its own generator seeded with `seeds[k]`, drawn on the CPU, so a
        (input, seed) pair gives the same chunk whatever else shares the batch, and on any device."""
        cfg = self.model.config
        noise = row_noise(seeds, (cfg.action_horizon, cfg.action_dim), len(inputs)).to(self.device)
        model_actions = self.sample(self.to_observation(inputs), noise).float().cpu().numpy()
        env_actions = self.transforms.outputs(model_actions, np.stack([x.raw_state for x in inputs]))
        return model_actions, env_actions
