"""PI0-FAST as a LIBERO chunk policy (openpi's `pi0_fast_libero` pipeline), with what LOOP needs recorded.

Per observation, as openpi: the images are rotated and resized like PI0's (the shared `LiberoInputs.prepare`: images
the env prepared, marked with `transforms.PREPARED_IMAGES_KEY`, are size-checked and kept as they are), all three
cameras are valid (the absent right wrist is a black image with mask True), the raw 8-dim state is
quantile-normalised and written into the prompt as 256 bins (`Task: ..., State: ...;\\n`). `act` decodes with the KV
cache (greedy by default, or at a temperature), takes the FAST ids between `Action: ` and `|`, decodes them to a
(H, 7) normalised chunk (zeros when they do not decode, as openpi), unnormalises it and adds the chunk-start state to
the first 6 dims (delta actions).

For RL each row also returns a `TokenRecord`: the decoded ids up to and including the first EOS and their
log-probabilities under the sampling distribution, the LOOP ratio's log pi_old. When sampling (temperature > 0),
each row's random numbers come from its own seed (`act(inputs, seeds)`), so a row decodes the same tokens whatever
else shares the batch; greedy decoding has no randomness and is `PI0FAST.sample_tokens` itself.

Deliberate difference from openpi: the action ids are located in the decoded id sequence instead of a
decode-to-text / re-encode round trip. For the PaliGemma tokenizer the round trip returns the same ids for
well-formed outputs; working on ids also serves small test tokenizers that cannot spell the FAST range, and keeps
the tokens RL trains on exactly the ones that were sampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from pi0_lightning.model.observation import Observation
from pi0_lightning.model.pi0_fast import EOS_ID, PI0FAST
from pi0_lightning.model.speed import SpeedConfig, apply_speed_paths
from pi0_lightning.policy.fast_tokenizer import FASTActionTokenizer
from pi0_lightning.policy.pi0_libero import LiberoInputs, PolicyInput
from pi0_lightning.policy.tokenizer import ACTION_CUE, ACTION_END, FASTPromptTokenizer
from pi0_lightning.policy.transforms import LiberoTransforms, Normalizer

FAST_TOKENIZER_DIR = "fast_tokenizer"
"""Where a checkpoint directory keeps its FAST processor (`processor_config.json`, `tokenizer.json`)."""


@dataclass
class TokenRecord:
    """What one decoded chunk was, for LOOP: ids through the first EOS and their sampling log-probs."""

    tokens: np.ndarray  # (n,) int64
    logp: np.ndarray  # (n,) float32
    decoded: bool
    """Whether the ids held a well-formed action chunk (otherwise the env got zeros)."""


class LiberoFASTPolicy(LiberoInputs):
    def __init__(
        self,
        model: PI0FAST,
        tokenizer: FASTPromptTokenizer,
        action_tokenizer: FASTActionTokenizer,
        transforms: LiberoTransforms,
        temperature: float = 0.0,
        max_decoding_steps: int = 256,
        device: str | torch.device = "cpu",
        speed: SpeedConfig | None = None,
    ):
        cfg = model.config
        lowest_fast = cfg.fast_offset - (action_tokenizer.vocab_size - 1)
        if tokenizer.vocab_size > lowest_fast:
            raise ValueError(
                f"text tokenizer ids (< {tokenizer.vocab_size}) overlap the FAST ids ({lowest_fast}..{cfg.fast_offset})"
                f" of a {cfg.vocab_size}-token model"
            )
        tokenizer.fast_offset = cfg.fast_offset
        self.model = model
        self.tokenizer = tokenizer
        self.action_tokenizer = action_tokenizer
        self.transforms = transforms
        self.temperature = temperature
        self.max_decoding_steps = max_decoding_steps
        self.device = torch.device(device)
        self.action_horizon = cfg.action_horizon
        # `speed` (None: the model as it is): a decoding step is host-bound, so CUDA graphs replay each one
        self.decoder = apply_speed_paths(model, speed) if speed is not None else None
        self._cue = tokenizer.processor.encode(ACTION_CUE)
        self._end = tokenizer.processor.encode(ACTION_END)

    @classmethod
    def build(
        cls,
        model: PI0FAST,
        norm_stats: str | Path | dict,
        tokenizer_file: str | Path,
        fast_tokenizer: str | Path | FASTActionTokenizer,
        delta_actions: bool = True,
        **kwargs,
    ) -> LiberoFASTPolicy:
        """openpi's `pi0_fast_libero` defaults: quantile normalisation, delta actions, right wrist valid."""
        transforms = LiberoTransforms(
            normalizer=Normalizer.from_json(norm_stats, mode="quantile"),
            model_action_dim=model.config.action_dim,
            delta_actions=delta_actions,
            mask_right_wrist=False,
            image_size=model.config.vision.image_size,
        )
        tok = FASTPromptTokenizer.from_file(tokenizer_file, max_len=model.config.max_token_len)
        if not isinstance(fast_tokenizer, FASTActionTokenizer):
            fast_tokenizer = FASTActionTokenizer.from_pretrained(fast_tokenizer)
        return cls(model, tok, fast_tokenizer, transforms, **kwargs)

    # ------------------------------------------------------------------ inputs

    def prompt_tokens(self, prompt: str, raw_state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tokenizer.encode_fast(prompt, self.transforms.normalizer.normalize_state(raw_state[None])[0])
        return enc["tokens"], enc["mask"]

    def extra_fields(self, tokens: torch.Tensor) -> dict:
        return {"token_ar_mask": torch.zeros_like(tokens)}  # the prefix attends bidirectionally

    def supervised_observation(self, inputs: list[PolicyInput], chunks: np.ndarray) -> Observation:
        return self.training_observation(inputs, chunks, device="cpu")

    def training_observation(
        self, inputs: list[PolicyInput], chunks: np.ndarray, device: str | torch.device | None = None
    ) -> Observation:
        """Supervised (openpi) training inputs: prefix + `Action: ` + FAST tokens of the normalised `chunks`
        (B, H, D) + `|` + EOS, with the ar and loss masks; for `PI0FAST.forward`."""
        tok = self.tokenizer
        encoded = []
        for x, chunk in zip(inputs, chunks, strict=True):
            prefix = x.tokens[: int(x.token_mask.sum())].tolist()
            encoded.append(tok.fast_layout(prefix, self.action_tokenizer.encode(chunk)))
        stack = {k: torch.from_numpy(np.stack([e[k] for e in encoded])) for k in encoded[0]}
        obs = replace(
            self.to_observation(inputs, device="cpu"),
            tokenized_prompt=stack["tokens"].long(),
            tokenized_prompt_mask=stack["mask"],
            token_ar_mask=stack["ar_mask"].long(),
            token_loss_mask=stack["loss_mask"],
        )
        return obs.to(device if device is not None else self.device)

    # ------------------------------------------------------------------ decoding

    def sample_rows(self, obs: Observation, seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """`PI0FAST.sample_tokens` (with the log-probs and the policy's decoder) with per-row randomness: decoding
        step t of row k draws its token by inverse CDF from the uniform u[k, t], u[k] from a CPU generator seeded with
        `seeds[k]`."""
        n = self.max_decoding_steps
        uniforms = torch.stack(
            [torch.rand(n, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64) for s in seeds]
        )
        return self.model.sample_tokens(
            obs, n, self.temperature, return_logp=True, decoder=self.decoder, uniforms=uniforms
        )

    # ------------------------------------------------------------------ outputs

    def action_ids(self, ids: list[int]) -> list[int] | None:
        """FAST ids between the first `Action: ` and the following `|` (or EOS / the end); None if there is no cue
        or a non-FAST id sits in between."""
        cue, n = self._cue, len(self._cue)
        start = next((i + n for i in range(len(ids) - n + 1) if ids[i : i + n] == cue), None)
        if start is None:
            return None
        offset, size = self.model.config.fast_offset, self.action_tokenizer.vocab_size
        fast = []
        for i in range(start, len(ids)):
            if ids[i : i + len(self._end)] == self._end or ids[i] == EOS_ID:
                break
            if not 0 <= offset - ids[i] < size:
                return None
            fast.append(offset - ids[i])
        return fast

    def decode_chunk(self, ids: list[int]) -> tuple[np.ndarray, bool]:
        """Normalised (H, D) chunk from decoded ids, and whether it was well formed (zeros otherwise, as openpi)."""
        h, d = self.action_horizon, self.model.config.action_dim
        fast = self.action_ids(ids)
        chunk = self.action_tokenizer.try_decode(fast, h, d) if fast else None
        if chunk is None:
            return np.zeros((h, d), dtype=np.float32), False
        return chunk.astype(np.float32), True

    @torch.no_grad()
    def act(self, inputs: list[PolicyInput], seeds: Sequence[int]) -> tuple[np.ndarray, np.ndarray, list[TokenRecord]]:
        """Greedy decoding (temperature 0) is `PI0FAST.sample_tokens` as it is; sampling draws row k's tokens with
        the random numbers of its own seed `seeds[k]` (`sample_rows`), so a row's tokens do not depend on the rest
        of the batch."""
        if len(seeds) != len(inputs):
            raise ValueError(f"got {len(seeds)} seeds for {len(inputs)} inputs")
        obs = self.to_observation(inputs)
        if self.temperature > 0:
            tokens, logp = self.sample_rows(obs, seeds)
        else:
            tokens, logp = self.model.sample_tokens(
                obs, max_decoding_steps=self.max_decoding_steps, return_logp=True, decoder=self.decoder
            )
        tokens, logp = tokens.cpu().numpy(), logp.cpu().numpy()
        chunks, records = [], []
        for row, row_logp in zip(tokens, logp, strict=True):
            eos = np.flatnonzero(row == EOS_ID)
            n = int(eos[0]) + 1 if eos.size else len(row)
            chunk, ok = self.decode_chunk(row[:n].tolist())
            chunks.append(chunk)
            records.append(TokenRecord(row[:n].astype(np.int64), row_logp[:n].astype(np.float32), ok))
        model_actions = np.stack(chunks)
        env_actions = self.transforms.outputs(model_actions, np.stack([x.raw_state for x in inputs]))
        return model_actions, env_actions, records
