"""PI0-FAST vs openpi's JAX outputs on the pi0_fast_tiny fixture: training forward, decoding, LOOP log-probs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pi0_lightning.model.config import IMAGE_KEYS
from pi0_lightning.model.observation import Observation
from pi0_lightning.model.pi0 import make_attn_mask
from pi0_lightning.model.pi0_fast import PI0FAST, PI0FASTConfig

TOL = 1e-4


@pytest.fixture(scope="module")
def case(openpi_fixtures, tmp_path_factory):
    pytest.importorskip("tensorstore")
    from pi0_lightning.convert.cli import main

    root = openpi_fixtures / "pi0_fast_tiny"
    out = tmp_path_factory.mktemp("fast") / "ckpt"
    assert main(["openpi", str(root), str(out)]) == 0
    # the fixture stores bfloat16 leaves; openpi's references upcast them exactly to float32, as loading does here
    model = PI0FAST.from_pretrained(out, dtype="float32")
    ref = np.load(root / "reference.npz")

    def t(key: str) -> torch.Tensor:
        return torch.from_numpy(np.asarray(ref[key]))

    obs = Observation(
        images={k: t(f"image_{k}").permute(0, 3, 1, 2).contiguous() for k in IMAGE_KEYS},
        image_masks={k: t(f"image_mask_{k}") for k in IMAGE_KEYS},
        state=t("state"),
        tokenized_prompt=t("train_tokenized_prompt").long(),
        tokenized_prompt_mask=t("train_tokenized_prompt_mask"),
        token_ar_mask=t("train_token_ar_mask"),
        token_loss_mask=t("train_token_loss_mask"),
    )
    return model, t, obs


def inference_observation(t, obs: Observation) -> Observation:
    """The fixture's inference prompt (prefix only) with the same images."""
    return Observation(
        obs.images,
        obs.image_masks,
        obs.state,
        t("infer_tokenized_prompt").long(),
        t("infer_tokenized_prompt_mask"),
        token_ar_mask=t("infer_token_ar_mask"),
    )


def err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_config_detected_from_the_tree(case):
    model, _, _ = case
    cfg = model.config
    assert (cfg.paligemma.width, cfg.paligemma.depth, cfg.paligemma.num_heads, cfg.vocab_size) == (16, 2, 8, 257152)
    assert sum(p.numel() for p in model.parameters()) == 4_174_592  # openpi's count


@torch.no_grad()
def test_masks(case):
    model, t, obs = case
    _, input_mask, ar = model.embed_inputs(obs)
    assert torch.equal(input_mask, t("train_input_mask")) and torch.equal(ar, t("train_ar_mask").long())
    assert torch.equal(make_attn_mask(input_mask, ar), t("train_attn_mask"))


@torch.no_grad()
def test_training_forward_matches_openpi(case):
    model, t, obs = case
    assert err(model.vision(obs.images["base_0_rgb"]), t("img_tokens_base_0_rgb")) <= TOL
    pre = model.pre_logits(obs)
    assert err(pre, t("train_pre_logits")) <= TOL
    logits = model.logits(pre)
    assert err(torch.logsumexp(logits, -1), t("train_logsumexp")) <= TOL
    assert err(logits[..., t("logits_sel_ids").long()], t("train_logits_sel")) <= TOL
    last = t("train_logits_last_index").long()
    assert err(logits[torch.arange(3), last], t("train_logits_last")) <= TOL
    assert err(model.token_logp(obs), t("train_target_logp")) <= TOL
    assert err(model(obs), t("train_loss")) <= TOL


def test_missing_fast_masks_are_clear_errors(case):
    model, _, obs = case
    bare = Observation(obs.images, obs.image_masks, obs.state, obs.tokenized_prompt, obs.tokenized_prompt_mask)
    with pytest.raises(ValueError, match="token_ar_mask"):
        model.pre_logits(bare)


@torch.no_grad()
def test_greedy_decoding_matches_openpi(case):
    model, t, obs = case
    infer = inference_observation(t, obs)
    tokens, step_logits = model.sample_tokens(infer, max_decoding_steps=8, return_logits=True)
    assert torch.equal(tokens, t("decode_output_tokens").long())
    logits = torch.stack(step_logits, 1)  # (B, 8, V): the logits each token was chosen from
    assert err(torch.logsumexp(logits, -1), t("decode_step_logsumexp")) <= TOL
    assert err(logits[..., t("logits_sel_ids").long()], t("decode_step_logits_sel")) <= TOL
    assert err(logits.topk(2, -1).values, t("decode_step_top2_logits")) <= TOL


@torch.no_grad()
def test_bfloat16_decoding_gives_openpi_bfloat16_tokens(case, openpi_fixtures, tmp_path):
    from pi0_lightning.convert.cli import main

    _, t, obs = case
    assert main(["openpi", str(openpi_fixtures / "pi0_fast_tiny"), str(tmp_path / "c")]) == 0
    model = PI0FAST.from_pretrained(tmp_path / "c", dtype="bfloat16")
    infer = inference_observation(t, obs)
    assert torch.equal(model.sample_tokens(infer, max_decoding_steps=8), t("decode_output_tokens_bfloat16").long())


def test_action_logp_recomputes_the_sampling_log_probs(case):
    """LOOP's ratio is 1 at unchanged weights: the teacher-forced pass reproduces the decode layout (rolled prefix,
    masked cameras, zero cache slots, position gap) of the openpi-parity decoder, at any temperature."""
    model, t, obs = case
    infer = inference_observation(t, obs)
    for temperature in (0.0, 0.7):
        g = torch.Generator().manual_seed(0)
        tokens, logits, logp = model.sample_tokens(
            infer, max_decoding_steps=8, temperature=temperature, generator=g, return_logits=True, return_logp=True
        )
        scale = temperature or 1.0
        chosen = torch.log_softmax(torch.stack(logits, 1) / scale, -1).gather(-1, tokens[:, : len(logits), None])
        torch.testing.assert_close(logp[:, : len(logits)], chosen[..., 0])
        again = model.action_logp(infer, tokens, temperature=temperature, max_decoding_steps=8)
        assert err(again[:, : len(logits)], logp[:, : len(logits)]) <= 1e-5
    again.sum().backward()  # differentiable: the LOOP loss trains through it
    assert model.llm.layers[0].experts[0].q_proj.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_variants():
    with torch.device("meta"):
        real = PI0FAST(PI0FASTConfig.variant("pi0_fast"))
    assert sum(p.numel() for p in real.parameters()) == 2_923_335_408  # openpi's pi0-FAST parameter count
    assert PI0FASTConfig.variant("pi0_fast").fast_offset == 257_023
    micro = PI0FASTConfig.variant("pi0_fast_micro")
    assert micro.fast_offset == 1536 - 129 and micro.vision.image_size == 112
    with pytest.raises(ValueError, match="unknown PI0-FAST variant"):
        PI0FASTConfig.variant("pi0_fast_huge")
