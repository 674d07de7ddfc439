"""Is a persistent denoising-layer kernel worth building? The action expert's four GEMMs of a batch-1 layer step,
chained, as separate kernel launches against one persistent kernel that keeps one or more programs per SM and waits
at a grid barrier between them.

    python -m pi0_lightning.benchmarks.persistent [--rows 51] [--layers 18] [--per-sm 1 2] [--out persistent.json]

Answer on an H100 (BENCHMARKS.md, session 8): no, not with this barrier. Four launches took 29.3-29.4 us per layer
step, one kernel per layer with three barriers 39.2-41.5 us (one or two programs per SM, atomic or load polls), one
kernel for all layers 39.8-41.5 us, and the L2 prefetch while waiting 91.1 us. Three programs per SM are not all
resident: the barrier gave up and the row failed, the GPU did not hang.

Why: after sessions 4-6 a batch-1 layer step costs ~45 us (fused GEMMs 33.4, attention 7.7 + combine 3.7) against
~11 us to read its 34.6 MB of weights once, and each kernel costs 4-6 us more than its bytes (BENCHMARKS.md). A
persistent kernel pays a grid barrier instead of a kernel boundary; if that is much cheaper, a whole-layer (or
whole-step) kernel is the way to the 12 ms goal. This measures only that question, on stand-in arithmetic: q/k/v
(1024 -> 2560), o (2048 -> 1024, reading the first 2048 q/k/v columns where the attention output would be), gate/up
(1024 -> 8192, no GeGLU) and down (4096 -> 1024), bf16 with float32 accumulation; no norms, attention or residuals.
Every variant runs the same phase code (`_gemm_phase`):

- `launches`: one kernel per GEMM, one program per work item (4 kernels per layer step);
- `persistent-layer`: one kernel per layer, one program per SM, a grid barrier between its GEMMs;
- `persistent-all`: one kernel for all layers (71 barriers at 18 layers);
- `persistent-all-prefetch`: as `persistent-all`, and each program, once it has arrived at a barrier, reads its
  next weight tiles through L2 while the others finish (they come from L2 after the barrier);
- `small_gemm`: the model's fused GEMMs (`model/small_gemm.py`: the norm folded into q/k/v and gate/up, GeGLU and
  residual adds fused) on the same shapes, the baseline the real layer step runs today.

The o and down GEMMs split K over 4 programs and add their float32 partials atomically into an output that the
GEMM two phases earlier zeroed (so no memset and no reduction kernel; the summation order varies, as with any atomic
split K). All layers' weights are distinct (623 MB at 18 layers, more than L2 holds), timed as CUDA graphs of ten
passes over the layers (a `sample_actions` call's 180 layer steps).

The grid barrier needs every program resident at once: one program per SM, and nothing else running on the GPU.
Triton's CPU interpreter runs programs one after another, so there the persistent variants run with one program (the
test does this); on a GPU they take the SM count.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pi0_lightning.benchmarks import graph_time_us, write_json
from pi0_lightning.model.kernels import triton

BLOCK_M, BLOCK_N, BLOCK_K = 64, 32, 128
SPLIT = 4  # K split of the 1024-column GEMMs: 32 column tiles x 4 = 128 work items, about one per SM
SPIN_LIMIT = 1 << 22
"""Polls of the barrier counter (~1 us each) after which a program stops waiting and flags the run as failed."""


@dataclass(frozen=True)
class Shapes:
    width: int = 1024
    qkv: int = 2560
    attn: int = 2048  # o's input: the first `attn` q/k/v columns stand in for the attention output
    mlp: int = 4096

    @property
    def gemms(self) -> list[tuple[int, int, int]]:
        """(N, K, K split) of q/k/v, o, gate/up and down, in chain order (the kernel's `_phase` in constexprs)."""
        w = self.width
        return [(self.qkv, w, 1), (w, self.attn, SPLIT), (2 * self.mlp, w, 1), (w, self.mlp, SPLIT)]

    @property
    def weight_bytes(self) -> int:
        """bf16 weight bytes of one layer step's four GEMMs."""
        return 2 * sum(n * k for n, k, _ in self.gemms)


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _zero_slice(Z, pid, NPROG: tl.constexpr, SIZE: tl.constexpr):
        """This program's share of zeroing the float32 buffer Z of SIZE elements."""
        PER: tl.constexpr = (SIZE + NPROG - 1) // NPROG
        for c in range(0, PER, 1024):  # constexpr bounds throughout: the CPU interpreter needs them
            offs = c + tl.arange(0, 1024)
            ok = (offs < PER) & (pid * PER + offs < SIZE)
            tl.store(Z + pid * PER + offs, tl.zeros([1024], tl.float32), mask=ok)

    @triton.jit
    def _gemm_phase(
        X, W, Y, Z, SINK, pid, M,
        N: tl.constexpr, K: tl.constexpr, SX: tl.constexpr, SPLIT_K: tl.constexpr, Z_SIZE: tl.constexpr,
        NPROG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PREFETCH_ONLY: tl.constexpr,
    ):  # fmt: skip
        """Y = X[:, :K] @ W.T for this program's work items (column tile x K part): stored in Y's dtype, or with
        SPLIT_K > 1 added atomically in float32 to a zeroed Y. Zeroes its share of Z (a later GEMM's output) too.
        PREFETCH_ONLY: only read the items' weight tiles once (into L2, for the GEMM to come); a sum that nobody
        reads keeps the loads."""
        if Z_SIZE > 0 and not PREFETCH_ONLY:
            _zero_slice(Z, pid, NPROG, Z_SIZE)
        rm = tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        row_ok = rm < M
        PART: tl.constexpr = K // SPLIT_K
        ITEMS: tl.constexpr = N // BLOCK_N * SPLIT_K
        total = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for r in range(0, (ITEMS + NPROG - 1) // NPROG):
            item = pid + r * NPROG
            if item < ITEMS:
                rn = (item // SPLIT_K) * BLOCK_N + tl.arange(0, BLOCK_N)
                k_start = (item % SPLIT_K) * PART
                acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                for kk in range(0, PART, BLOCK_K):
                    k = k_start + kk + rk
                    w_ptrs = W + rn[:, None] * K + k[None, :]
                    if PREFETCH_ONLY:
                        total += tl.load(w_ptrs, eviction_policy="evict_last").to(tl.float32)
                    else:
                        # activations via L2 (.cg): other SMs wrote them since this SM last read the buffer
                        x_ptrs = X + rm[:, None] * SX + k[None, :]
                        x = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0, cache_modifier=".cg")
                        w = tl.load(w_ptrs)
                        acc = tl.dot(x.to(w.dtype), tl.trans(w), acc)
                if not PREFETCH_ONLY:
                    out = Y + rm[:, None] * N + rn[None, :]
                    if SPLIT_K > 1:
                        tl.atomic_add(out, acc, mask=row_ok[:, None], sem="relaxed")
                    else:
                        tl.store(out, acc.to(Y.dtype.element_ty), mask=row_ok[:, None])
        if PREFETCH_ONLY:  # noqa: SIM102 (a constexpr branch: the sum below only exists in prefetch mode)
            if tl.sum(tl.sum(total, 1), 0) == 1.2345e30:  # never true: the sum only has to exist
                tl.store(SINK, 1.0)

    @triton.jit
    def _arrive(COUNT):
        tl.debug_barrier()  # every thread of this program has issued its stores before the (release) arrival
        tl.atomic_add(COUNT, 1, sem="release")

    @triton.jit
    def _poll(COUNT, POLL_LOADS: tl.constexpr):
        return tl.load(COUNT, volatile=True) if POLL_LOADS else tl.atomic_add(COUNT, 0, sem="acquire")

    @triton.jit
    def _wait(COUNT, target, SPIN_LIMIT: tl.constexpr, POLL_LOADS: tl.constexpr):
        """Spin until COUNT reaches target. POLL_LOADS: poll with plain (volatile) loads and take one acquiring
        atomic at the end, so that waiting programs do not queue read-modify-writes on the counter's L2 line ahead of
        the arrivals; else every poll is an acquiring atomic."""
        seen = _poll(COUNT, POLL_LOADS)
        polls = 0
        while (seen < target) & (polls < SPIN_LIMIT):
            seen = _poll(COUNT, POLL_LOADS)
            polls += 1
        if POLL_LOADS:
            seen = tl.atomic_add(COUNT, 0, sem="acquire")  # orders this program's later loads after the arrivals
        if seen < target:  # some program never arrived, so it was not resident: flag it rather than hang the GPU
            tl.atomic_xchg(COUNT + 2, 1)
        tl.debug_barrier()

    @triton.jit
    def _phase(
        i, layer, H, QKV, OPROJ, GU, WQKV, WO, WGU, WD, SINK, pid, M,
        WIDTH: tl.constexpr, NQKV: tl.constexpr, ATTN: tl.constexpr, MLP: tl.constexpr, SPLIT_K: tl.constexpr,
        NPROG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PREFETCH_ONLY: tl.constexpr,
    ):  # fmt: skip
        """GEMM i (0 q/k/v, 1 o, 2 gate/up, 3 down) of `layer` (`Shapes.gemms` on the host). H and OPROJ (BLOCK_M x
        WIDTH float32) are split-K outputs: q/k/v zeroes OPROJ before o adds into it, gate/up zeroes H (read by
        q/k/v) before down adds to it. PREFETCH_ONLY: read the GEMM's weight tiles into L2, nothing else."""
        ZERO: tl.constexpr = BLOCK_M * WIDTH
        if i == 0:
            _gemm_phase(H, WQKV + layer * NQKV * WIDTH, QKV, OPROJ, SINK, pid, M, NQKV, WIDTH, WIDTH, 1, ZERO, NPROG,
                        BLOCK_M, BLOCK_N, BLOCK_K, PREFETCH_ONLY)  # fmt: skip
        elif i == 1:
            _gemm_phase(QKV, WO + layer * WIDTH * ATTN, OPROJ, OPROJ, SINK, pid, M, WIDTH, ATTN, NQKV, SPLIT_K, 0,
                        NPROG, BLOCK_M, BLOCK_N, BLOCK_K, PREFETCH_ONLY)  # fmt: skip
        elif i == 2:
            _gemm_phase(OPROJ, WGU + layer * 2 * MLP * WIDTH, GU, H, SINK, pid, M, 2 * MLP, WIDTH, WIDTH, 1, ZERO,
                        NPROG, BLOCK_M, BLOCK_N, BLOCK_K, PREFETCH_ONLY)  # fmt: skip
        else:
            _gemm_phase(GU, WD + layer * WIDTH * MLP, H, H, SINK, pid, M, WIDTH, MLP, 2 * MLP, SPLIT_K, 0, NPROG,
                        BLOCK_M, BLOCK_N, BLOCK_K, PREFETCH_ONLY)  # fmt: skip

    @triton.jit
    def _one_gemm(
        H, QKV, OPROJ, GU, WQKV, WO, WGU, WD, SINK, M, layer,
        GEMM: tl.constexpr, WIDTH: tl.constexpr, NQKV: tl.constexpr, ATTN: tl.constexpr, MLP: tl.constexpr,
        SPLIT_K: tl.constexpr, NPROG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        _phase(GEMM, layer, H, QKV, OPROJ, GU, WQKV, WO, WGU, WD, SINK, tl.program_id(0), M,
               WIDTH, NQKV, ATTN, MLP, SPLIT_K, NPROG, BLOCK_M, BLOCK_N, BLOCK_K, False)  # fmt: skip

    @triton.jit
    def _persistent(
        H, QKV, OPROJ, GU, WQKV, WO, WGU, WD, SINK, COUNT, M, first_layer,
        LAYERS: tl.constexpr, WIDTH: tl.constexpr, NQKV: tl.constexpr, ATTN: tl.constexpr, MLP: tl.constexpr,
        PREFETCH: tl.constexpr, SPLIT_K: tl.constexpr, NPROG: tl.constexpr, SPIN_LIMIT: tl.constexpr,
        POLL_LOADS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """LAYERS layers from `first_layer` on NPROG programs, a grid barrier between consecutive GEMMs. COUNT[0]
        counts arrivals (barrier j is passed at j x NPROG), COUNT[1] exits: the last program out resets both for the
        next launch, once every program has passed every barrier. COUNT[2] is set if a barrier gave up waiting."""
        pid = tl.program_id(0)
        for step in range(0, 4 * LAYERS):
            layer = first_layer + step // 4
            i = step % 4
            if step > 0:
                _arrive(COUNT)
                if PREFETCH:
                    _phase(i, layer, H, QKV, OPROJ, GU, WQKV, WO, WGU, WD, SINK, pid, M, WIDTH, NQKV, ATTN, MLP,
                           SPLIT_K, NPROG, BLOCK_M, BLOCK_N, BLOCK_K, True)  # fmt: skip
                _wait(COUNT, step * NPROG, SPIN_LIMIT, POLL_LOADS)
            _phase(i, layer, H, QKV, OPROJ, GU, WQKV, WO, WGU, WD, SINK, pid, M, WIDTH, NQKV, ATTN, MLP, SPLIT_K,
                   NPROG, BLOCK_M, BLOCK_N, BLOCK_K, False)  # fmt: skip
        if tl.atomic_add(COUNT + 1, 1, sem="acq_rel") == NPROG - 1:
            tl.atomic_xchg(COUNT, 0)
            tl.atomic_xchg(COUNT + 1, 0)


class LayerChain:
    """`layers` layers' weights and the activation buffers of the stand-in chain; `run(variant)` does one pass."""

    def __init__(self, shapes: Shapes, layers: int, rows: int, device: torch.device, dtype: torch.dtype, seed=0):
        if rows > BLOCK_M:
            raise ValueError(f"persistent: at most {BLOCK_M} rows, got {rows}")
        tiles_fit = all(n % BLOCK_N == 0 for n in (shapes.width, shapes.qkv, shapes.mlp))
        split_fits = all(k % (SPLIT * BLOCK_K) == 0 for k in (shapes.attn, shapes.mlp))
        if not (tiles_fit and split_fits and shapes.width % BLOCK_K == 0 and shapes.attn <= shapes.qkv):
            raise ValueError(f"persistent: {shapes} does not fit the tiling ({BLOCK_N}-column tiles, K in "
                             f"{BLOCK_K}-deep steps, o and down split {SPLIT} ways)")  # fmt: skip
        g = torch.Generator(device=device).manual_seed(seed)
        s, self.shapes, self.layers, self.rows = shapes, shapes, layers, rows

        def weights(n: int, k: int) -> torch.Tensor:  # scaled so the chain neither explodes nor vanishes
            return (torch.randn(layers, n, k, generator=g, device=device) * k**-0.5).to(dtype)

        self.wqkv, self.wo = weights(s.qkv, s.width), weights(s.width, s.attn)
        self.wgu, self.wd = weights(2 * s.mlp, s.width), weights(s.width, s.mlp)
        self.h0 = torch.randn(rows, s.width, generator=g, device=device)
        # float32 with a full row block: down (o) adds its split-K partials into h (o), which the kernels zero
        self.h = torch.zeros(BLOCK_M, s.width, device=device)
        self.qkv = torch.empty(rows, s.qkv, device=device, dtype=dtype)
        self.o = torch.zeros(BLOCK_M, s.width, device=device)
        self.gu = torch.empty(rows, 2 * s.mlp, device=device, dtype=dtype)
        self.count = torch.zeros(3, device=device, dtype=torch.int32)  # arrivals, exits, barrier-failed flag
        self.sink = torch.zeros(1, device=device)
        self.sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        self.per_sm = 1
        """Persistent programs per SM: more keep more loads in flight; all must still be resident at once."""
        self.poll_loads = False
        """Barrier polls as plain loads (else acquiring atomics), `_wait`."""

    @property
    def programs(self) -> int:
        return self.sms * self.per_sm

    def reference(self) -> torch.Tensor:
        """The chain in torch, float32 accumulation, rounded where the kernels round (q/k/v and gate/up outputs)."""
        h, dtype = self.h0, self.wqkv.dtype
        for i in range(self.layers):
            qkv = (h.to(dtype).float() @ self.wqkv[i].float().T).to(dtype)
            o = qkv[:, : self.shapes.attn].float() @ self.wo[i].float().T
            gu = (o.to(dtype).float() @ self.wgu[i].float().T).to(dtype)
            h = gu[:, : self.shapes.mlp].float() @ self.wd[i].float().T
        return h

    def _args(self) -> tuple:
        return (self.h, self.qkv, self.o, self.gu, self.wqkv, self.wo, self.wgu, self.wd, self.sink)

    def _constants(self, programs: int) -> dict[str, int]:
        s = self.shapes
        return dict(WIDTH=s.width, NQKV=s.qkv, ATTN=s.attn, MLP=s.mlp, SPLIT_K=SPLIT, NPROG=programs,
                    BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4, num_stages=3)  # fmt: skip

    def check(self) -> None:
        """Raise if a grid barrier of the persistent kernel gave up waiting since the last check."""
        if self.count[2].item():
            self.count.zero_()
            raise RuntimeError(
                f"persistent: a grid barrier timed out: not all {self.programs} programs were resident at once "
                "(another process on the GPU?); the timings and outputs of this run are void"
            )

    @property
    def output(self) -> torch.Tensor:
        """The last layer's output (rows, width) float32."""
        return self.h[: self.rows]

    def reset(self) -> None:
        """The first layer's input (every other buffer is written, or zeroed by the chain itself, before it is read)."""
        self.h[: self.rows].copy_(self.h0)

    def run(self, variant: str) -> None:
        s = self.shapes
        if variant == "launches":
            items = [triton.cdiv(n, BLOCK_N) * split for n, _, split in s.gemms]
            for layer in range(self.layers):
                for i, programs in enumerate(items):
                    _one_gemm[(programs,)](*self._args(), self.rows, layer, GEMM=i, **self._constants(programs))
        elif variant.startswith("persistent"):
            per_layer = variant == "persistent-layer"
            for first, count in [(layer, 1) for layer in range(self.layers)] if per_layer else [(0, self.layers)]:
                self.launch_persistent(first, count, prefetch=variant.endswith("prefetch"))
        else:
            raise ValueError(f"persistent: unknown variant {variant!r}")

    def launch_persistent(
        self, first: int, layers: int, prefetch: bool = False, grid: int | None = None, spin_limit: int = SPIN_LIMIT
    ) -> None:
        """One persistent kernel over `layers` layers from `first`, for `self.programs` programs. `grid` launches
        fewer than that (tests: a barrier that waits for programs that never come gives up after `spin_limit`
        polls and flags it for `check`)."""
        constants = self._constants(self.programs)
        _persistent[(grid or self.programs,)](*self._args(), self.count, self.rows, first, LAYERS=layers,
                                              PREFETCH=prefetch, SPIN_LIMIT=spin_limit, POLL_LOADS=self.poll_loads,
                                              **constants)  # fmt: skip


VARIANTS = ("launches", "persistent-layer", "persistent-all", "persistent-all-prefetch")


def small_gemm_pass(chain: LayerChain) -> Callable[[], None]:
    """The model's fused GEMMs on the chain's shapes: q/k/v with the norm folded, o + residual, gate/up with the norm
    folded and GeGLU, down + residual; a fixed tensor stands in for the attention output."""
    from pi0_lightning.model import small_gemm

    s = chain.shapes
    h = chain.h0.to(chain.wqkv.dtype)[None]
    attn = torch.randn(1, chain.rows, s.attn, device=h.device, dtype=h.dtype)

    def run() -> None:
        x = h
        for i in range(chain.layers):
            small_gemm.linear(x, chain.wqkv[i], rms_eps=1e-6)
            x = small_gemm.linear(attn, chain.wo[i], residual=x)
            inner = small_gemm.linear(x, chain.wgu[i], rms_eps=1e-6, geglu=True)
            x = small_gemm.linear(inner, chain.wd[i], residual=x)

    return run


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=51, help="GEMM rows: 51 action tokens at batch 1")
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--passes", type=int, default=10, help="passes over the layers per timed graph (Euler steps)")
    p.add_argument("--variants", nargs="+", default=[*VARIANTS, "small_gemm"], choices=[*VARIANTS, "small_gemm"])
    p.add_argument("--per-sm", nargs="+", type=int, default=[1, 2], help="persistent programs per SM, each timed")
    p.add_argument("--poll", nargs="+", default=["atomic", "load"], choices=["atomic", "load"],
                   help="barrier polls: acquiring atomics, or plain loads then one atomic (each timed)")  # fmt: skip
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or triton is None:
        raise SystemExit("persistent: error: needs a CUDA device and Triton")
    device = torch.device("cuda")
    chain = LayerChain(Shapes(), args.layers, args.rows, device, torch.bfloat16)
    reference = chain.reference()
    mbytes = chain.shapes.weight_bytes / 1e6
    print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, {chain.sms} SMs, "
          f"{args.rows} rows, {args.layers} layers, {mbytes:.1f} MB of weights per layer step")  # fmt: skip
    print("\n| variant | programs per SM | barrier polls | kernels per layer step | us per layer step | weight GB/s | "
          "x 180 layer steps (ms) | max abs diff vs torch |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    runs = []
    for variant in args.variants:
        persistent = variant.startswith("persistent")
        for per_sm, poll in itertools.product(args.per_sm, args.poll) if persistent else [(None, None)]:
            runs.append((variant, per_sm, poll))
    rows = []
    for variant, per_sm, poll in runs:
        chain.per_sm, chain.poll_loads = per_sm or 1, poll == "load"
        if variant == "small_gemm":
            one_pass, kernels, diff = small_gemm_pass(chain), 4.0, float("nan")
        else:

            def one_pass(variant=variant) -> None:
                chain.reset()
                chain.run(variant)

            kernels = {"launches": 4.0, "persistent-layer": 1.0}.get(variant, 1 / args.layers)
        label = f"| {variant} | {per_sm or '-'} | {poll or '-'} | {kernels:.3g} |"
        try:
            if variant != "small_gemm":
                one_pass()
                chain.check()
                diff = (chain.output - reference).abs().max().item()
            per_pass = graph_time_us(lambda i, f=one_pass: f(), calls=args.passes)
            chain.check()
        except RuntimeError as e:  # a barrier gave up: not every program was resident
            print(f"{label} failed: {e} | | | |", flush=True)
            continue
        us = per_pass / args.layers
        r = dict(variant=variant, per_sm=per_sm, poll=poll, kernels=kernels, us_per_layer_step=us,
                 gbps=mbytes / us * 1e3, ms_per_180=us * 0.18, max_abs_diff=diff)  # fmt: skip
        rows.append(r)
        print(f"{label} {us:.2f} | {r['gbps']:.0f} | {r['ms_per_180']:.2f} | {diff:.1e} |", flush=True)
    write_json(args.out, rows)
    return rows


if __name__ == "__main__":
    main()
