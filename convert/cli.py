"""`pi0-convert`: openpi / LeRobot checkpoints <-> pi0_lightning checkpoint directories.

    pi0-convert openpi CKPT_DIR OUT_DIR          # orbax params/ (+ assets/*/norm_stats.json) -> ours
    pi0-convert lerobot SRC OUT_DIR              # openpi-PyTorch or LeRobot model.safetensors -> ours
    pi0-convert export-lerobot OUR_DIR OUT_DIR   # ours -> current LeRobot layout (CFG condition folded in as w = 1)

Every failure prints one line and exits with code 2; outputs are written to a temporary directory and renamed into
place only when complete, so nothing half-written is ever left behind.

LeRobot's PI0 has no advantage-condition embedding: a policy trained by RL with CFG is exported as its guidance w = 1
(positive-conditioned) policy, exactly; guidance w > 1 needs the embedding and is not expressible in LeRobot's layout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from pi0_lightning.checkpoint import (
    CONFIG,
    WEIGHTS,
    build_model,
    check_state_dict,
    load_pretrained,
    load_state_dict_file,
    read_norm_stats,
    save_pretrained,
)
from pi0_lightning.convert import lerobot, openpi
from pi0_lightning.convert.errors import ConversionError
from pi0_lightning.convert.io import atomic_output_dir
from pi0_lightning.convert.orbax import read_openpi_params, resolve_params_dir
from pi0_lightning.model.pi0 import PI0
from pi0_lightning.policy.tokenizer import find_tokenizer_file


def find_norm_stats(root: Path, asset_id: str | None) -> dict[str, Any] | None:
    """openpi keeps `assets/<asset_id>/norm_stats.json` (asset ids may contain '/')."""
    files = sorted((root / "assets").glob("**/norm_stats.json")) if (root / "assets").is_dir() else []
    if asset_id:
        files = [f for f in files if f.parent.relative_to(root / "assets").as_posix() == asset_id]
        if not files:
            raise ConversionError(f"no assets/{asset_id}/norm_stats.json under {root}")
    if len(files) > 1:
        ids = ", ".join(f.parent.relative_to(root / "assets").as_posix() for f in files)
        raise ConversionError(f"several norm_stats.json under {root}/assets ({ids}); choose one with --asset-id")
    if not files:
        return None
    try:
        return json.loads(files[0].read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{files[0]}: invalid JSON ({e})") from None


def _tokenizer(root: Path, explicit: str | None) -> Path | None:
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConversionError(f"tokenizer file {path} does not exist")
        return path
    return find_tokenizer_file(root) if root.is_dir() else None


def _load_model(config, state) -> PI0:
    model = build_model(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(expected, {k: v.shape for k, v in state.items()}, "converted weights")
    model.load_state_dict(state, assign=True)
    return model


def convert_openpi(args: argparse.Namespace) -> Path:
    src = Path(args.src)
    params_dir = resolve_params_dir(src)
    root = params_dir.parent if params_dir.name == "params" else src
    params = read_openpi_params(params_dir)
    overrides = {"action_horizon": args.action_horizon, "max_token_len": args.max_token_len}
    if openpi.detect_kind(params) == "pi0_fast":
        config = openpi.infer_fast_config(params, **overrides)
    else:
        config = openpi.infer_config(params, **overrides)
    fast_dir = _fast_tokenizer(args.fast_tokenizer)
    if fast_dir is not None and openpi.detect_kind(params) != "pi0_fast":
        raise ConversionError("--fast-tokenizer is for PI0-FAST checkpoints; this one is PI0 / PI0.5")
    model = _load_model(config, openpi.openpi_to_state_dict(params, config))
    return save_pretrained(
        model,
        args.out,
        norm_stats=find_norm_stats(root, args.asset_id),
        tokenizer_path=_tokenizer(root, args.tokenizer),
        metadata={"source": str(src.resolve()), "source_format": "openpi"},
        overwrite=args.overwrite,
        asset_dirs={"fast_tokenizer": fast_dir} if fast_dir is not None else None,
    )


def _fast_tokenizer(path: str | None) -> Path | None:
    """A local copy of the FAST processor, checked by loading it (it is bundled as `fast_tokenizer/`)."""
    if path is None:
        return None
    from pi0_lightning.policy.fast_tokenizer import FASTActionTokenizer

    try:
        FASTActionTokenizer.from_pretrained(path)
    except (FileNotFoundError, ImportError, ValueError, OSError) as e:
        raise ConversionError(f"--fast-tokenizer: {e}") from None
    return Path(path)


def convert_lerobot(args: argparse.Namespace) -> Path:
    src = Path(args.src)
    if not src.exists():
        raise ConversionError(f"{src} does not exist")
    file = src / WEIGHTS if src.is_dir() else src
    if not file.is_file():
        raise ConversionError(f"{src} has no {WEIGHTS}; expected an openpi-PyTorch or LeRobot checkpoint")
    root = file.parent
    hints: dict[str, Any] = {}
    if (root / CONFIG).is_file():
        try:
            hints = json.loads((root / CONFIG).read_text())
        except json.JSONDecodeError as e:
            raise ConversionError(f"{root / CONFIG}: invalid JSON ({e})") from None
    state = lerobot.normalize_keys(load_state_dict_file(file))
    config = lerobot.infer_config(
        state,
        hints,
        head_dim=args.head_dim,
        vision_heads=args.vision_heads,
        action_horizon=args.action_horizon,
        max_token_len=args.max_token_len,
    )
    our_keys = list(build_model(config).state_dict())
    model = _load_model(config, lerobot.lerobot_to_state_dict(state, config, our_keys))
    return save_pretrained(
        model,
        args.out,
        norm_stats=find_norm_stats(root, args.asset_id) or read_norm_stats(root),
        tokenizer_path=_tokenizer(root, args.tokenizer),
        metadata={"source": str(src.resolve()), "source_format": "lerobot"},
        overwrite=args.overwrite,
    )


def export_lerobot(args: argparse.Namespace) -> Path:
    model = load_pretrained(args.src, dtype="float32")
    state, config = lerobot.fold_cfg_condition(model.state_dict(), model.config)
    state = lerobot.state_dict_to_lerobot(state)
    norm_stats = read_norm_stats(args.src)
    with atomic_output_dir(Path(args.out), overwrite=args.overwrite) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(lerobot.lerobot_config(config), indent=2) + "\n")
        if norm_stats is not None:
            (tmp / "norm_stats.json").write_text(json.dumps(norm_stats, indent=2) + "\n")
    if config.num_cfg_conditions != model.config.num_cfg_conditions:
        # after the write, so that a failure still prints exactly one line
        print(
            f"pi0-convert {args.command}: note: CFG condition folded in as guidance w = 1 "
            "(the positive-conditioned policy); guidance w > 1 needs the embedding, which LeRobot's PI0 lacks",
            file=sys.stderr,
        )
    return Path(args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pi0-convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, importing: bool = True) -> None:
        p.add_argument("src", help="source checkpoint directory")
        p.add_argument("out", help="output directory (must not exist or be empty, unless --overwrite)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
        if importing:
            p.add_argument("--action-horizon", type=int, help="actions per chunk (not stored in weights; default 50)")
            p.add_argument("--max-token-len", type=int, help="prompt length (default 48 for pi0, 200 for pi05)")
            p.add_argument("--asset-id", help="which assets/<id>/norm_stats.json to carry over if several exist")
            p.add_argument("--tokenizer", help="PaliGemma tokenizer file to bundle (default: found in the source)")

    p = sub.add_parser("openpi", help="openpi orbax checkpoint -> ours")
    common(p)
    p.add_argument(
        "--fast-tokenizer",
        help="PI0-FAST: directory with the FAST processor (processor_config.json + tokenizer.json) to bundle",
    )
    p.set_defaults(fn=convert_openpi)
    p = sub.add_parser("lerobot", help="openpi-PyTorch / LeRobot safetensors -> ours")
    common(p)
    p.add_argument("--head-dim", type=int, help="Gemma head_dim if config.json names no known variant (default 256)")
    p.add_argument("--vision-heads", type=int, help="SigLIP heads for non-standard widths (default 16 for 1152)")
    p.set_defaults(fn=convert_lerobot)
    p = sub.add_parser("export-lerobot", help="ours -> current LeRobot layout (CFG condition folded in as w = 1)")
    common(p, importing=False)
    p.set_defaults(fn=export_lerobot)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        out = args.fn(args)
    except ConversionError as e:
        print(f"pi0-convert {args.command}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.perf_counter() - start:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
