"""`resolve_assets` for randomly initialised models: the tokenizer built for them fits LIBERO's prompts."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("libero.libero", reason="LIBERO is not installed (pip install 'pi0-lightning[libero]')")

from pi0_lightning.envs.libero import suite_tasks  # noqa: E402
from pi0_lightning.envs.spec import identity_norm_stats  # noqa: E402
from pi0_lightning.model.config import PI0Config  # noqa: E402
from pi0_lightning.model.pi0 import PI0  # noqa: E402
from pi0_lightning.policy.loading import resolve_assets  # noqa: E402
from pi0_lightning.policy.pi0_libero import LiberoPolicy  # noqa: E402
from pi0_lightning.policy.tokenizer import clean_prompt  # noqa: E402

SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")


@pytest.mark.parametrize("variant", ["pi0_tiny", "pi05_tiny"])
def test_every_libero_instruction_fits_a_random_tiny_models_prompt(
    variant: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = PI0(PI0Config.variant(variant))
    instructions = {suite: [t.language for t in suite_tasks(suite)] for suite in SUITES}
    # the tokenizer is trained on the run's own tasks: a whole suite, or a single task, where it splits most finely
    training_sets = [*instructions.values(), *([i] for suite in instructions.values() for i in suite)]
    # and on any other subset: no id covers less than one character, and BOS and the "\n" cue add two
    longest = max(len(clean_prompt(i)) for suite in instructions.values() for i in suite)
    assert longest + 2 <= model.config.max_token_len
    with caplog.at_level(logging.WARNING, logger="pi0_lightning.policy.tokenizer"):
        for texts in training_sets:
            assets = resolve_assets(model, None, instructions=texts, env_norm_stats=identity_norm_stats())
            tokenizer = LiberoPolicy.build(model, assets.norm_stats, assets.tokenizer).tokenizer
            for text in texts:
                _, mask = tokenizer.encode(text)
                assert mask.sum() == len(tokenizer.build_ids(text)) <= tokenizer.max_len, text
    assert not [r for r in caplog.records if "exceeds max length" in r.getMessage()]
