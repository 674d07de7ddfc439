#!/usr/bin/env python
"""Same-run speed/memory anchor: LeRobot 0.6.1 PI0 (`PI0Policy`), random weights, bf16.

Self-contained: only torch + lerobot (+ what lerobot itself imports). No network: no tokenizer and no
weights are fetched; the language prompt is fed as already-tokenised ids + attention mask, which is
what `PI0Policy` itself consumes (`observation.language.tokens` / `.attention_mask`; tokenisation lives
in LeRobot's processor pipeline, which is not built here).

Inputs (LeRobot PI0 defaults): 2 valid cameras 3x224x224 + 1 masked empty camera (`empty_cameras=1`,
padded with -1 and mask 0 by `PI0Policy._preprocess_images`), 48 prompt tokens (tokenizer_max_length),
state 32 (max_state_dim), chunk 50 x 32 actions, 10 Euler steps. Prefix = 3*256 + 48 = 816 tokens.

Measured (each wrapped: one failure prints the exception and the rest goes on):
  * inference, one action chunk, at each --batches:
      - `sample_actions`: policy.model.sample_actions(images, img_masks, lang_tokens, lang_masks, state)
        on already-preprocessed tensors (the lowest-level LeRobot call),
      - `predict_action_chunk`: policy.predict_action_chunk(batch) on a raw LeRobot batch dict (adds
        LeRobot's image preprocessing: fp32 cast, *2-1, empty-camera padding, state padding);
    median of --repeats after --warmup, synchronised around each call, CUDA events; peak allocated memory.
  * training step at --train (default 16 with gradient checkpointing): policy.forward(batch) (LeRobot's
    training loss, incl. its .item()) + backward + clip_grad_norm_(1.0) + AdamW step (LeRobot's own
    optimizer preset: lr 2.5e-5, betas (0.9, 0.95), wd 0.01) + zero_grad, bf16 params (vision tower and
    projector fp32, as LeRobot keeps them); median of --train-repeats after --train-warmup; OOM-safe.

Not a dependency of pi0_lightning: LeRobot 0.6.1 pins transformers 5.4-5.5, so install it into a separate folder
that comes first on PYTHONPATH, only for this script (wheels: lerobot==0.6.1 transformers==5.5.4 tokenizers==0.22.2
draccus==0.11.6 mergedeep toml gymnasium==1.4.0 farama-notifications, ~16 MB):
  pip download --no-deps -d wheels lerobot==0.6.1 transformers==5.5.4 tokenizers==0.22.2 draccus==0.11.6 \
      mergedeep toml gymnasium==1.4.0 farama-notifications
  pip install -q --no-index --no-deps --target /tmp/lr wheels/*.whl
  PYTHONPATH=/tmp/lr python -m pi0_lightning.benchmarks.lerobot_anchor --out lerobot.json
(/tmp/lr rather than a folder in the repository: the lerobot wheel ships a top-level `tests` package.)
CPU smoke test:
  python -m pi0_lightning.benchmarks.lerobot_anchor --device cpu --repeats 1 --warmup 0 --batches 1 --train 1:ckpt \
      --train-repeats 1 --train-warmup 0 --smoke-depth 2 --out /tmp/lr.json
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch

GIB = 1024**3
RESULTS: dict = {}
OUT_PATH = None


def log(*a):
    print(*a, flush=True)


def save():
    if OUT_PATH is None:
        return
    tmp = OUT_PATH + ".tmp"
    with open(tmp, "w") as f:
        json.dump(RESULTS, f, indent=2, default=str)
    os.replace(tmp, OUT_PATH)


def record_error(where: str, e: BaseException):
    msg = f"{type(e).__name__}: {e}"
    log(f"!! {where} failed: {msg}")
    traceback.print_exc()
    sys.stdout.flush()
    RESULTS.setdefault("errors", []).append({"where": where, "error": msg[:2000]})
    save()
    return msg


def is_oom(e: BaseException) -> bool:
    oom_t = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", RuntimeError)
    return isinstance(e, oom_t) or "out of memory" in str(e).lower()


# ------------------------------------------------------------------------------------------ timing
class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time_call(self, fn):
        """Returns (gpu_ms or None, wall_ms, output); synchronised before and after the call."""
        self.sync()
        if self.cuda:
            s = torch.cuda.Event(enable_timing=True)
            e = torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            s.record()
            out = fn()
            e.record()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) * 1e3
            return s.elapsed_time(e), wall, out
        t0 = time.perf_counter()
        out = fn()
        wall = (time.perf_counter() - t0) * 1e3
        return None, wall, out

    def reset_peak(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak(self):
        if self.cuda:
            return {
                "peak_alloc_gib": torch.cuda.max_memory_allocated() / GIB,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
            }
        try:
            import resource

            return {"max_rss_gib_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}
        except Exception:  # noqa: BLE001
            return {}


def summarize(gpu_ms, wall_ms):
    main = gpu_ms if gpu_ms and all(x is not None for x in gpu_ms) else wall_ms
    return {
        "median_ms": statistics.median(main),
        "min_ms": min(main),
        "max_ms": max(main),
        "median_wall_ms": statistics.median(wall_ms),
        "times_ms": [round(x, 3) for x in main],
        "timer": "cuda_events" if main is gpu_ms else "perf_counter",
    }


def timing_line(r: dict) -> str:
    """The progress line of one summarised measurement (median, min, wall median, peak memory when known)."""
    peak = f", peak {r['peak_alloc_gib']:.2f} GiB" if "peak_alloc_gib" in r else ""
    return f"   median {r['median_ms']:.1f} ms (min {r['min_ms']:.1f}, wall {r['median_wall_ms']:.1f}){peak}"


# ------------------------------------------------------------------------------------------ model
CAM_KEYS = ("observation.images.base_0_rgb", "observation.images.left_wrist_0_rgb")


def build_policy(args, device: torch.device):
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.pi0 import modeling_pi0
    from lerobot.policies.pi0.configuration_pi0 import PI0Config
    from lerobot.policies.pi0.modeling_pi0 import PI0Policy

    if args.smoke_depth:  # CPU smoke test only: shallower Gemma stacks (same code path)
        orig = modeling_pi0.get_gemma_config

        def shallow(variant):
            c = orig(variant)
            c.depth = args.smoke_depth
            return c

        modeling_pi0.get_gemma_config = shallow
        log(f"[smoke] Gemma depth patched to {args.smoke_depth} (not a benchmark configuration)")

    res = (args.image_size, args.image_size)
    input_features = {k: PolicyFeature(type=FeatureType.VISUAL, shape=(3, *res)) for k in CAM_KEYS}
    input_features["observation.state"] = PolicyFeature(type=FeatureType.STATE, shape=(args.state_dim,))
    output_features = {"action": PolicyFeature(type=FeatureType.ACTION, shape=(args.action_dim,))}

    cfg = PI0Config(
        dtype="bfloat16",
        device=device.type,
        empty_cameras=1,  # -> observation.images.empty_camera_0, masked
        input_features=input_features,
        output_features=output_features,
        paligemma_variant=args.paligemma_variant,
        action_expert_variant=args.expert_variant,
        num_inference_steps=args.steps,
        gradient_checkpointing=False,  # toggled on for the training measurement only
        compile_model=False,
        push_to_hub=False,
    )
    t0 = time.perf_counter()
    with torch.device(device):
        policy = PI0Policy(cfg)
    policy.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    return policy, cfg, build_s


def param_stats(policy):
    by_dtype: dict = {}
    n = 0
    for p in policy.parameters():
        by_dtype[str(p.dtype)] = by_dtype.get(str(p.dtype), 0) + p.numel()
        n += p.numel()
    sub = {}
    m = policy.model
    try:
        pg = m.paligemma_with_expert.paligemma
        sub["vision_tower"] = sum(p.numel() for p in pg.model.vision_tower.parameters())
        sub["multi_modal_projector"] = sum(p.numel() for p in pg.model.multi_modal_projector.parameters())
        sub["language_model"] = sum(p.numel() for p in pg.model.language_model.parameters())
        sub["lm_head"] = sum(p.numel() for p in pg.lm_head.parameters())
        sub["gemma_expert"] = sum(p.numel() for p in m.paligemma_with_expert.gemma_expert.parameters())
    except Exception as e:  # noqa: BLE001
        sub["error"] = str(e)
    return {"total": n, "by_dtype": by_dtype, "submodules": sub}


def make_raw_batch(args, cfg, b: int, device: torch.device, with_actions: bool):
    """A LeRobot-format batch: images in [0,1] float32 BCHW, padded state, tokenised prompt."""
    g = torch.Generator(device="cpu").manual_seed(1234 + b)
    batch = {}
    for k in CAM_KEYS:
        batch[k] = torch.rand(b, 3, args.image_size, args.image_size, generator=g).to(device)
    batch["observation.state"] = torch.randn(b, args.state_dim, generator=g).to(device)
    batch["observation.language.tokens"] = torch.randint(
        0, 257152, (b, args.prompt_len), generator=g, dtype=torch.long
    ).to(device)
    batch["observation.language.attention_mask"] = torch.ones(b, args.prompt_len, dtype=torch.bool).to(device)
    if with_actions:
        batch["action"] = torch.randn(b, cfg.chunk_size, args.action_dim, generator=g).to(device)
    return batch


def make_model_inputs(policy, batch):
    """Exactly what predict_action_chunk hands to model.sample_actions (built once, outside timing)."""
    with torch.no_grad():
        images, img_masks = policy._preprocess_images(batch)  # noqa: SLF001
        state = policy.prepare_state(batch)
    return (
        images,
        img_masks,
        batch["observation.language.tokens"],
        batch["observation.language.attention_mask"],
        state,
    )


# ------------------------------------------------------------------------------------------ benches
def bench_inference(args, policy, cfg, device, timer: Timer):
    policy.eval()
    inf = RESULTS.setdefault("inference", {})
    for b in args.batches:
        for level in args.levels:
            key = f"{level}/b{b}"
            log(f"-- inference {key}")
            try:
                batch = make_raw_batch(args, cfg, b, device, with_actions=False)
                if level == "sample_actions":
                    inputs = make_model_inputs(policy, batch)
                    shapes = {
                        "images": [list(x.shape) for x in inputs[0]],
                        "image_dtype": str(inputs[0][0].dtype),
                        "img_masks": [x.tolist() if x.numel() <= 4 else list(x.shape) for x in inputs[1]],
                        "lang_tokens": list(inputs[2].shape),
                        "state": list(inputs[4].shape),
                    }

                    def fn(inputs=inputs):  # @torch.no_grad inside, as in LeRobot
                        return policy.model.sample_actions(*inputs, num_steps=args.steps)
                else:
                    shapes = {k: list(v.shape) for k, v in batch.items()}

                    def fn(batch=batch):  # @torch.no_grad inside, as in LeRobot
                        return policy.predict_action_chunk(batch)

                timer.reset_peak()
                for _ in range(args.warmup):
                    timer.time_call(fn)
                gpu, wall = [], []
                out = None
                for _ in range(args.repeats):
                    g, w, out = timer.time_call(fn)
                    gpu.append(g)
                    wall.append(w)
                r = summarize(gpu, wall)
                r.update(timer.peak())
                r["out_shape"] = list(out.shape)
                r["out_finite"] = bool(torch.isfinite(out.float()).all().item())
                r["inputs"] = shapes
                inf[key] = r
                log(timing_line(r) + f", out {r['out_shape']}")
                del out, fn, batch
            except Exception as e:  # noqa: BLE001
                inf[key] = {"error": ("OOM: " if is_oom(e) else "") + record_error(f"inference {key}", e)}
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            save()


def bench_train(args, policy, cfg, device, timer: Timer):
    tr = RESULTS.setdefault("train", {})
    for spec in args.train:
        b_str, _, mode = spec.partition(":")
        b = int(b_str)
        ckpt = mode in ("ckpt", "gc", "checkpointing", "")
        key = f"b{b}_{'ckpt' if ckpt else 'nockpt'}"
        log(f"-- train {key}")
        opt = None
        try:
            if ckpt:
                policy.model.gradient_checkpointing_enable()
            else:
                policy.model.gradient_checkpointing_disable()
            policy.train()
            preset = cfg.get_optimizer_preset()  # AdamWConfig(lr=2.5e-5, betas=(0.9,0.95), wd=0.01, clip 1.0)
            opt = preset.build(policy.get_optim_params())
            clip = preset.grad_clip_norm
            batch = make_raw_batch(args, cfg, b, device, with_actions=True)
            params = [p for p in policy.parameters() if p.requires_grad]
            losses = []

            def step(batch=batch, params=params, clip=clip, opt=opt):
                loss, _ = policy.forward(batch)  # LeRobot's training forward (calls .item() inside)
                loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(params, clip)
                opt.step()
                opt.zero_grad()
                return loss.detach(), gn.detach()

            timer.reset_peak()
            for _ in range(args.train_warmup):
                _, _, (loss_value, _g) = timer.time_call(step)
                losses.append(float(loss_value))
            gpu, wall = [], []
            gn = None
            for _ in range(args.train_repeats):
                g, w, (loss_value, gn) = timer.time_call(step)
                gpu.append(g)
                wall.append(w)
                losses.append(float(loss_value))
            r = summarize(gpu, wall)
            r.update(timer.peak())
            r["losses"] = losses
            r["last_grad_norm"] = float(gn) if gn is not None else None
            r["optimizer"] = {
                "type": type(opt).__name__,
                "lr": preset.lr,
                "betas": list(preset.betas),
                "weight_decay": preset.weight_decay,
                "grad_clip_norm": clip,
            }
            r["gradient_checkpointing"] = ckpt
            tr[key] = r
            log(timing_line(r) + f", losses {[round(x, 3) for x in losses]}")
        except Exception as e:  # noqa: BLE001
            oom = is_oom(e)
            msg = record_error(f"train {key}", e)
            tr[key] = {"error": ("OOM: " if oom else "") + msg, "oom": oom, **timer.peak()}
            if oom:
                log(f"   OOM at train {key}")
        finally:
            # release optimizer state and grads before the next config
            try:
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
                    opt.state.clear()
                for p in policy.parameters():
                    p.grad = None
            except Exception:  # noqa: BLE001
                pass
            opt = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            save()
    policy.model.gradient_checkpointing_disable()
    policy.eval()


# ------------------------------------------------------------------------------------------ report
def fmt(r, key="median_ms"):
    if not r:
        return "-"
    if "error" in r:
        return "OOM" if r.get("oom") or r["error"].startswith("OOM") else "error"
    s = f"{r[key]:.1f} ms"
    if "peak_alloc_gib" in r:
        s += f" ({r['peak_alloc_gib']:.1f} GiB)"
    return s


def print_tables(args):
    inf = RESULTS.get("inference", {})
    lines = [
        "",
        "## LeRobot PI0 inference, one action chunk "
        f"({args.steps} steps, eager), median of {args.repeats}; peak allocated incl. weights",
        "",
        "| batch | " + " | ".join(args.levels) + " |",
        "|---|" + "---|" * len(args.levels),
    ]
    for b in args.batches:
        lines.append(f"| {b} | " + " | ".join(fmt(inf.get(f"{lv}/b{b}")) for lv in args.levels) + " |")
    tr = RESULTS.get("train", {})
    if tr:
        lines += [
            "",
            "## LeRobot PI0 training step (forward + backward + clip + AdamW), bf16 params, "
            f"median of {args.train_repeats}",
            "",
            "| config | time (peak) |",
            "|---|---|",
        ]
        for k, r in tr.items():
            lines.append(f"| {k} | {fmt(r)} |")
    text = "\n".join(lines)
    log(text)
    RESULTS["markdown"] = text


# ------------------------------------------------------------------------------------------ main
def offline() -> None:
    """Never touch the network (no hub lookups for configs, tokenizers or weights): set before LeRobot is imported,
    for this run only, not when the module is imported."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main():
    global OUT_PATH
    offline()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON results path")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument(
        "--levels",
        default="sample_actions,predict_action_chunk",
        help="comma list of: sample_actions, predict_action_chunk",
    )
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--train", default="16:ckpt", help="comma list of B:ckpt|B:nockpt; empty string to skip training")
    ap.add_argument("--train-repeats", type=int, default=5)
    ap.add_argument("--train-warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--state-dim", type=int, default=32)
    ap.add_argument("--action-dim", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--paligemma-variant", default="gemma_2b")
    ap.add_argument("--expert-variant", default="gemma_300m")
    ap.add_argument("--smoke-depth", type=int, default=0, help="CPU smoke test only: patch Gemma depth")
    ap.add_argument("--skip-inference", action="store_true")
    args = ap.parse_args()
    import importlib.util

    if importlib.util.find_spec("lerobot") is None:
        sys.exit("lerobot_anchor: error: LeRobot 0.6.1 is not importable; see this script's docstring for the install")
    args.batches = [int(x) for x in args.batches.split(",") if x.strip()]
    args.levels = [x.strip() for x in args.levels.split(",") if x.strip()]
    args.train = [x.strip() for x in args.train.split(",") if x.strip()]
    OUT_PATH = args.out
    os.makedirs(os.path.dirname(os.path.abspath(OUT_PATH)), exist_ok=True)

    device = torch.device(args.device)
    torch.manual_seed(0)
    timer = Timer(device)

    meta = {
        "argv": sys.argv,
        "args": {k: v for k, v in vars(args).items()},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }
    RESULTS["meta"] = meta
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
        meta["capability"] = list(torch.cuda.get_device_capability(device))
    try:
        import lerobot
        import transformers

        meta["transformers"] = transformers.__version__
        meta["transformers_file"] = transformers.__file__
        meta["lerobot_file"] = lerobot.__file__
        try:
            from importlib.metadata import version

            meta["lerobot"] = version("lerobot")
        except Exception:  # noqa: BLE001
            meta["lerobot"] = getattr(lerobot, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        record_error("import lerobot/transformers", e)
    log(json.dumps(meta, indent=1, default=str))
    save()

    try:
        policy, cfg, build_s = build_policy(args, device)
    except Exception as e:  # noqa: BLE001
        record_error("build PI0Policy", e)
        save()
        sys.exit(1)
    meta["build_s"] = build_s
    meta["params"] = param_stats(policy)
    meta["config"] = {
        "dtype": cfg.dtype,
        "chunk_size": cfg.chunk_size,
        "n_action_steps": cfg.n_action_steps,
        "max_state_dim": cfg.max_state_dim,
        "max_action_dim": cfg.max_action_dim,
        "num_inference_steps": cfg.num_inference_steps,
        "tokenizer_max_length": cfg.tokenizer_max_length,
        "image_resolution": list(cfg.image_resolution),
        "empty_cameras": cfg.empty_cameras,
        "image_features": list(cfg.image_features),
        "paligemma_variant": cfg.paligemma_variant,
        "action_expert_variant": cfg.action_expert_variant,
        "device": cfg.device,
    }
    if device.type == "cuda":
        meta["weights_alloc_gib"] = torch.cuda.memory_allocated() / GIB
    log(f"built PI0Policy in {build_s:.1f} s; params {meta['params']}")
    if "weights_alloc_gib" in meta:
        log(f"weights allocated: {meta['weights_alloc_gib']:.2f} GiB")
    save()

    if not args.skip_inference:
        try:
            bench_inference(args, policy, cfg, device, timer)
        except Exception as e:  # noqa: BLE001
            record_error("inference (outer)", e)
    if args.train:
        try:
            bench_train(args, policy, cfg, device, timer)
        except Exception as e:  # noqa: BLE001
            record_error("train (outer)", e)
    print_tables(args)
    save()
    log(f"wrote {OUT_PATH}")


if __name__ == "__main__":
    main()
