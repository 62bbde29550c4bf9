"""Benchmark the training step: jaxasr (JAX/XLA:CPU) vs transformers (PyTorch), Whisper tiny and base.

    python tools/bench_train.py [--models tiny base] [--batch 8] [--label-len 64] [--steps 5]
                                [--threads N] [--dtype float32|bfloat16] [--remat none|full|dots|...]
                                [--scan] [--attention auto|xla|blocked] [--xla-flags FLAGS]

Both sides train the same thing, in this one process:
  weights    one random init (jaxasr `Whisper(cfg, rngs=nnx.Rngs(0))`), converted to a transformers
             state dict with `jaxasr.convert.hf_whisper.jaxasr_to_hf` and loaded into
             `WhisperForConditionalGeneration`; the first step's loss and gradient norm of both are
             printed side by side (fp32: the losses must agree to rel 1e-4; torch's norm is what
             `clip_grad_norm_` returns, which on tiny came out 1.1e-3 below the float64 norm of
             torch's own gradients, while jaxasr's matched that to 1e-7: the gradients agree per
             tensor, tests/models/test_whisper.py::test_gradients_match_transformers);
  batch      B x label-len random tokens, full 3000-frame random log-mel features, every token in
             the loss; the same arrays on both sides, every step;
  step       forward, token cross-entropy (mean over tokens), backward, global-norm clip 1.0,
             AdamW (lr 1e-5, betas 0.9/0.999, eps 1e-8, weight decay 0.01 on matrices and
             embeddings only: jaxasr's default decay pattern, mirrored by torch parameter groups);
             the whole model is trained. jaxasr: `TrainStep` (one jitted program, params and
             optimizer state donated) from `build_optimizer`; torch: `loss.backward()`,
             `clip_grad_norm_`, `torch.optim.AdamW(foreach=True)`, `zero_grad(set_to_none=True)`.

Timing: `--warmup` steps per side (default 2: XLA compilation and torch's lazy init in the first,
reported apart; jaxasr's second step still faults in ~2.6 GB of fresh pages for tiny, 5 s of
system time, once per run), then `--steps` timed steps, round-robin jaxasr/torch so that load from
other processes on a shared host hits both alike. A jaxasr step is timed until its metrics are
ready (JAX dispatches asynchronously). Best and median step time and examples/s are reported;
ratios print last (> 1: jaxasr faster): of the best steps, of the medians, and the median over
rounds of the ratio within a round (adjacent steps share the host's load of that moment).

Threads: the process is pinned to `--threads` cores (`os.sched_setaffinity`, before jax and torch
load) and torch runs `torch.set_num_threads(--threads)`. XLA:CPU sizes its intra-op pool from the
schedulable CPUs (tsl::port::MaxParallelism, which honours the affinity mask), so both frameworks
use the same N cores; OMP/MKL/OpenBLAS_NUM_THREADS are set to N as well.

FLOP/s: analytic model FLOPs per step (`train_flops`: every matmul and convolution of encoder and
decoder from the config, attention scores included, x3 for forward + backward) divided by the
step time, against `jaxasr.training.metrics.measured_matmul_peak()` (a jitted 2048x2048 fp32
matmul on the same cores; torch's own matmul peak is printed beside it for reference). XLA's cost
analysis is not used: the CPU encoder's blocked attention is a `lax.map` loop, whose body XLA
counts once.
"""

from __future__ import annotations

import argparse
import os
import sys


def _pin_threads(argv: list[str]) -> int:
    """Pin the process to N cores before any thread pool starts; N from --threads (default: all)."""
    available = sorted(os.sched_getaffinity(0))
    n = len(available)
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            n = int(argv[i + 1])
        elif a.startswith("--threads="):
            n = int(a.split("=", 1)[1])
    n = max(1, min(n, len(available)))
    os.sched_setaffinity(0, available[:n])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    return n


N_THREADS = _pin_threads(sys.argv[1:])

from jaxasr.host_memory import retain_freed_memory  # noqa: E402

# For both frameworks alike, as the CLIs do: before any thread allocates.
RETAINED = retain_freed_memory()

import dataclasses  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402

import numpy as np  # noqa: E402

LR, WEIGHT_DECAY, CLIP_NORM = 1e-5, 0.01, 1.0
LOSS_RTOL = 1e-4  # first-step loss agreement required in fp32


# --------------------------------------------------------------------------- FLOPs


def train_flops(cfg, batch: int, label_len: int) -> float:
    """Model FLOPs of one training step (2 per multiply-add; backward = 2x forward).

    Encoder over T = max_source_positions frames, decoder over `label_len` tokens with full
    (unmasked-cost) self-attention, cross-attention over T, tied output projection to the vocab."""
    d, t, n = cfg.d_model, cfg.max_source_positions, label_len
    enc = 2 * (2 * t) * (3 * cfg.num_mel_bins) * d + 2 * t * (3 * d) * d  # conv1 (stride 1), conv2 (stride 2)
    enc += cfg.encoder_layers * (
        2 * 4 * t * d * d  # q, k, v, out projections
        + 2 * 2 * t * t * d  # scores and weighted values
        + 2 * 2 * t * d * cfg.encoder_ffn_dim  # fc1, fc2
    )
    dec = cfg.decoder_layers * (
        2 * 4 * n * d * d + 2 * 2 * n * n * d  # self-attention
        + 2 * 2 * n * d * d + 2 * 2 * t * d * d + 2 * 2 * n * t * d  # cross: q/out, k/v over T, attention
        + 2 * 2 * n * d * cfg.decoder_ffn_dim  # MLP
    )
    dec += 2 * n * d * cfg.vocab_size  # logits
    return 3.0 * batch * (enc + dec)


def torch_matmul_peak(n: int = 2048, repeats: int = 3) -> float:
    """torch's counterpart of measured_matmul_peak: best FLOP/s of an n x n fp32 matmul."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# --------------------------------------------------------------------------- the two sides


@dataclasses.dataclass
class Side:
    """One framework's train step on one model: `step()` runs a step, returns (loss, grad norm)."""

    name: str
    mode: str
    build_s: float
    step: Callable[[], tuple[float, float]]
    warmup_s: float = 0.0
    first: tuple[float, float] = (float("nan"), float("nan"))
    times: list[float] = dataclasses.field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def make_batch(cfg, batch: int, label_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (batch, label_len + 1), dtype=np.int32)
    return {
        "features": rng.standard_normal((batch, cfg.num_mel_bins, cfg.n_audio_frames), np.float32),
        "decoder_input_ids": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": np.ones((batch, label_len), np.float32),
        "is_text": np.zeros((batch,), bool),
    }


def build_jaxasr(cfg, batch_np: dict[str, np.ndarray]) -> tuple[Side, dict]:
    """jaxasr's TrainStep on a fresh random Whisper; also returns the initial weights (flat NumPy)."""
    import jax
    from flax import nnx

    from jaxasr.models.state import flat_state
    from jaxasr.models.whisper import Whisper
    from jaxasr.parallel.mesh import global_batch, make_mesh
    from jaxasr.training.optimizer import build_optimizer
    from jaxasr.training.step import TrainStep, trainable_filter

    start = time.perf_counter()
    model = Whisper(cfg, rngs=nnx.Rngs(0))
    flat = {k: np.asarray(v) for k, v in flat_state(model).items()}  # before TrainStep donates the arrays
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    trainable = nnx.state(model, trainable_filter(()))
    tx, _ = build_optimizer({"peak_lr": LR, "weight_decay": WEIGHT_DECAY, "clip_norm": CLIP_NORM}, trainable)
    train_step = TrainStep.create(model, tx, mesh)
    batch = global_batch(batch_np, mesh)
    build_s = time.perf_counter() - start

    def step() -> tuple[float, float]:
        metrics = train_step(batch)
        loss, gnorm = jax.device_get((metrics["loss"], metrics["grad_norm"]))  # waits for the step
        return float(loss), float(gnorm)

    mode = f"TrainStep jit, {cfg.dtype}" + (", scan" if cfg.scan_layers else "") + (
        f", remat={cfg.remat_policy}" if cfg.remat_policy != "none" else "") + (
        f", attention={cfg.attention_impl}" if cfg.attention_impl else "")
    return Side("jaxasr", mode, build_s, step), flat


def build_torch(cfg, flat: dict, batch_np: dict[str, np.ndarray], dtype: str) -> Side:
    """transformers' Whisper with the same weights, trained with the same loss and optimizer."""
    import torch
    from transformers import WhisperConfig as HFWhisperConfig
    from transformers import WhisperForConditionalGeneration

    from jaxasr.convert.hf_whisper import jaxasr_to_hf

    start = time.perf_counter()
    hf_cfg = HFWhisperConfig(**cfg.hf_fields(), dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    model = WhisperForConditionalGeneration(hf_cfg).to(torch.float32)
    state = {k: torch.from_numpy(np.array(v)) for k, v in jaxasr_to_hf(flat, cfg).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"proj_out.weight"}:  # proj_out is tied to the token embedding
        raise RuntimeError(f"state dict mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if model.proj_out.weight.data_ptr() != model.model.decoder.embed_tokens.weight.data_ptr():
        raise RuntimeError("proj_out is not tied to embed_tokens")
    model.train()
    # Decay matrices and embeddings, not biases and norm scales: jaxasr's default decay pattern.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), eps=1e-8, foreach=True)
    features = torch.from_numpy(batch_np["features"])
    inputs = torch.from_numpy(batch_np["decoder_input_ids"]).long()
    labels = torch.from_numpy(batch_np["labels"]).long().reshape(-1)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    build_s = time.perf_counter() - start

    def step() -> tuple[float, float]:
        with autocast:
            logits = model(input_features=features, decoder_input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item(), gnorm.item()

    attn = getattr(model.config, "_attn_implementation", "?")
    return Side("torch", f"transformers {dtype}, attn={attn}, AdamW foreach", build_s, step)


# --------------------------------------------------------------------------- timing


def warm_up(side: Side, steps: int) -> None:
    start = time.perf_counter()
    side.first = side.step()
    side.warmup_s = time.perf_counter() - start
    for _ in range(steps - 1):
        side.step()


def paired_ratio(ours: Side, theirs: Side) -> float:
    """Median over rounds of theirs/ours step time (> 1: ours faster)."""
    return statistics.median(t / o for o, t in zip(ours.times, theirs.times))


def interleaved(sides: Sequence[Side], steps: int) -> None:
    """`steps` timed steps of each side, round-robin, so that outside load falls on all alike."""
    for _ in range(steps):
        for side in sides:
            start = time.perf_counter()
            side.step()
            side.times.append(time.perf_counter() - start)


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny", "base"], help="WhisperConfig presets")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--label-len", type=int, default=64, help="decoder tokens per example")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side after the warm-up steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side first (the first compiles)")
    p.add_argument("--threads", type=int, default=N_THREADS,
                   help="cores the process is pinned to and torch intra-op threads (default: all)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype (params and optimizer fp32); bfloat16: jaxasr cfg.dtype, torch autocast")
    p.add_argument("--remat", default="none", help="jaxasr remat policy (none, full, dots, dots_no_batch)")
    p.add_argument("--scan", action="store_true", help="jaxasr: nnx.scan over layers instead of unrolling")
    p.add_argument("--attention", choices=["auto", "xla", "blocked"], default="auto",
                   help="jaxasr attention_impl: auto (CPU: per-head loop), xla, blocked (query-block loop)")
    p.add_argument("--xla-flags", default=None, help="set XLA_FLAGS for this run (before jax loads)")
    args = p.parse_args(argv)
    if min(args.batch, args.label_len, args.steps, args.warmup) < 1:
        p.error("--batch, --label-len, --steps and --warmup must be positive")
    if args.xla_flags is not None:
        os.environ["XLA_FLAGS"] = args.xla_flags

    import torch

    torch.set_num_threads(N_THREADS)

    import jax
    import transformers
    from transformers.utils import logging as hf_logging

    from jaxasr.models.whisper import WhisperConfig
    from jaxasr.training.metrics import measured_matmul_peak

    hf_logging.set_verbosity_error()
    peak = measured_matmul_peak()
    torch_peak = torch_matmul_peak()
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print(f"threads: pinned to {N_THREADS} of {os.cpu_count()} cores (sched_setaffinity); torch intra-op "
          f"{torch.get_num_threads()}; XLA:CPU pool from the affinity mask; freed heap memory retained "
          f"(jaxasr.host_memory, both sides): {RETAINED}"
          + (f"; XLA_FLAGS={os.environ['XLA_FLAGS']!r}" if os.environ.get("XLA_FLAGS") else ""))
    print(f"matmul peak (2048^2 fp32): jax {peak / 1e9:.1f} GFLOP/s (MFU denominator), "
          f"torch {torch_peak / 1e9:.1f} GFLOP/s")
    print(f"batch {args.batch} x {args.label_len} tokens, 3000-frame features, {args.dtype}; AdamW lr {LR} "
          f"wd {WEIGHT_DECAY}, clip {CLIP_NORM}; {args.warmup} warm-up + {args.steps} timed steps per side, "
          "interleaved\n")

    rows = []
    for name in args.models:
        cfg = WhisperConfig.preset(name, dtype=args.dtype, scan_layers=args.scan, remat_policy=args.remat,
                                   attention_impl=None if args.attention == "auto" else args.attention)
        batch_np = make_batch(cfg, args.batch, args.label_len)
        ours, flat = build_jaxasr(cfg, batch_np)
        n_params = sum(int(np.prod(v.shape)) for k, v in flat.items() if k != ("encoder", "embed_positions"))
        theirs = build_torch(cfg, flat, batch_np, args.dtype)
        del flat
        for side in (ours, theirs):
            warm_up(side, args.warmup)
        (l_j, g_j), (l_t, g_t) = ours.first, theirs.first
        rel = abs(l_j - l_t) / abs(l_t)
        verdict = "ok" if rel <= LOSS_RTOL else ("MISMATCH" if args.dtype == "float32" else "(bf16, not checked)")
        print(f"{name}: {n_params / 1e6:.1f} M params; first-step loss jaxasr {l_j:.6f} torch {l_t:.6f} "
              f"(rel {rel:.1e}, {verdict}); grad norm jaxasr {g_j:.5f} torch {g_t:.5f} "
              f"(rel {abs(g_j - g_t) / abs(g_t):.1e})")
        interleaved((ours, theirs), args.steps)
        flops = train_flops(cfg, args.batch, args.label_len)
        for s in (ours, theirs):
            print(f"  {s.name:8s} best {s.best:.3f} s, median {s.median:.3f} s, {args.batch / s.best:.2f} ex/s, "
                  f"{flops / s.best / 1e9:.1f} GFLOP/s; steps " + " ".join(f"{t:.2f}" for t in s.times))
            s.step = None  # drop the model, optimizer state and buffers before the next model is built
        rows.append((name, flops, ours, theirs))
        gc.collect()

    header = (f"{'model':6s} {'system':8s} {'ex/s':>7s} {'best s':>7s} {'median s':>8s} {'warm-up s':>9s} "
              f"{'build s':>7s} {'GFLOP/s':>8s} {'MFU %':>6s}  mode")
    print("\n" + header)
    print("-" * len(header))
    for name, flops, *sides in rows:
        for s in sides:
            print(f"{name:6s} {s.name:8s} {args.batch / s.best:7.2f} {s.best:7.3f} {s.median:8.3f} "
                  f"{s.warmup_s:9.2f} {s.build_s:7.2f} {flops / s.best / 1e9:8.1f} "
                  f"{100 * flops / s.best / peak:6.1f}  {s.mode}")
    print(f"(ex/s and GFLOP/s from the best step; analytic train FLOPs per step: "
          + ", ".join(f"{name} {flops / 1e12:.2f} TFLOP" for name, flops, *_ in rows)
          + f"; MFU against the jax matmul peak {peak / 1e9:.1f} GFLOP/s)")

    print()
    for name, _, ours, theirs in rows:
        print(f"ratio jaxasr/torch {name} (examples/s, best step): {theirs.best / ours.best:.2f}x "
              f"(median {theirs.median / ours.median:.2f}x, within rounds {paired_ratio(ours, theirs):.2f}x)")


if __name__ == "__main__":
    main()
