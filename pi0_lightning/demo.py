"""`make demo` (until the RL loop lands): convert openpi checkpoints, load them, run PI0 inference, check parity.

With `../shared/fixtures/openpi` present it converts the tiny openpi PI0 and PI0.5 checkpoints with `pi0-convert`,
samples actions from openpi's stored inputs and noise, and prints the difference to openpi's own JAX outputs. Without
the fixtures it builds a tiny random PI0, saves and reloads it, and samples actions from random inputs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from pi0_lightning.model.config import IMAGE_KEYS, PI0Config
from pi0_lightning.model.observation import Observation
from pi0_lightning.model.pi0 import PI0

FIXTURE_DIRS = (
    Path.cwd().parent / "shared" / "fixtures" / "openpi",
    Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "openpi",
)


def reference_observation(ref) -> Observation:
    """The model inputs of an openpi reference fixture (`reference.npz`, NHWC images in [-1, 1]) as an Observation."""

    def t(key: str) -> torch.Tensor:
        return torch.from_numpy(np.asarray(ref[key]))

    return Observation(
        images={k: t(f"image_{k}").permute(0, 3, 1, 2).contiguous() for k in IMAGE_KEYS},
        image_masks={k: t(f"image_mask_{k}") for k in IMAGE_KEYS},
        state=t("state"),
        tokenized_prompt=t("tokenized_prompt").long(),
        tokenized_prompt_mask=t("tokenized_prompt_mask"),
    )


def _timed(fn, repeats: int = 3) -> tuple[torch.Tensor, float]:
    out = fn()
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return out, (time.perf_counter() - start) / repeats * 1000


def run_fixtures(fixtures: Path, out: Path) -> list[tuple[str, ...]]:
    from pi0_lightning.convert.cli import main as convert

    rows = []
    for name in ("pi0_tiny", "pi05_tiny"):
        ref = np.load(fixtures / name / "reference.npz")
        ckpt = out / name
        argv = ["openpi", str(fixtures / name), str(ckpt), "--overwrite"]
        if convert(argv + ["--max-token-len", str(ref["tokenized_prompt"].shape[1])]) != 0:
            raise SystemExit(2)
        obs = reference_observation(ref)
        noise = torch.from_numpy(ref["noise"])
        for dtype, key in (("float32", "actions_float32"), ("bfloat16", "actions_bfloat16")):
            model = PI0.from_pretrained(ckpt, dtype=dtype)
            actions, ms = _timed(lambda m=model, o=obs, n=noise: m.sample_actions(o, noise=n))
            expected = torch.from_numpy(ref[key])
            err = (actions - expected).abs().max().item()
            rel = ((actions - expected).norm() / expected.norm()).item()
            rows.append((name, dtype, f"{err:.2e}", f"{rel:.2e}", f"{ms:.0f}"))
    return rows


def run_random(out: Path) -> list[tuple[str, ...]]:
    torch.manual_seed(0)
    cfg = PI0Config.variant("pi0_tiny")
    PI0(cfg).save_pretrained(out / "pi0_tiny_random", overwrite=True)
    model = PI0.from_pretrained(out / "pi0_tiny_random")
    obs = Observation(
        images={k: torch.rand(2, 3, 224, 224) * 2 - 1 for k in IMAGE_KEYS},
        image_masks={k: torch.tensor([True, k != "right_wrist_0_rgb"]) for k in IMAGE_KEYS},
        state=torch.randn(2, cfg.action_dim),
        tokenized_prompt=torch.randint(3, cfg.vocab_size, (2, cfg.max_token_len)),
        tokenized_prompt_mask=torch.ones(2, cfg.max_token_len, dtype=torch.bool),
    )
    actions, ms = _timed(lambda: model.sample_actions(obs))
    return [("pi0_tiny (random)", "float32", "n/a", "n/a", f"{ms:.0f}  shape {tuple(actions.shape)}")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="where converted checkpoints are written")
    args = parser.parse_args()
    out = Path(args.out)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    fixtures = next((d for d in FIXTURE_DIRS if d.is_dir()), None)
    if fixtures is not None:
        print(f"converting openpi fixtures from {fixtures}")
        rows = run_fixtures(fixtures, out)
    else:
        print("no ../shared/fixtures/openpi here: using a tiny random PI0 instead")
        rows = run_random(out)
    header = ("model", "dtype", "max abs err vs openpi", "rel L2", "sample_actions ms (CPU, batch 3)")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\ncheckpoints written under {out.resolve()} (load with PI0.from_pretrained)")


if __name__ == "__main__":
    main()
