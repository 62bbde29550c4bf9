"""Benchmark the Whisper log-mel front end against transformers' WhisperFeatureExtractor.

    python tools/bench_features.py [--clips 32] [--n-mels 80] [--repeats 7] [--jax-batch 8]

Clips are random noise of 5-15 s (cost depends on length, not content). Methods run
interleaved, `repeats` times each; the best run counts, since on a shared host noise only
ever adds time. JAX is timed on padded batches already built on the host, after a warm-up
call that compiles it. Ratios are per-clip speedups over the faster of HF's two modes.
On a small shared host, `taskset -c 0` gives steadier single-core numbers (torch then
uses one thread too). Freed heap memory is retained for all methods (`jaxasr.host_memory`, as the
CLIs do); JAXASR_RETAIN_FREED_MEMORY=0 measures glibc's defaults.
"""

from jaxasr.host_memory import retain_freed_memory

RETAINED = retain_freed_memory()  # before numpy, torch and XLA start their threads

import argparse  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import WhisperFeatureExtractor  # noqa: E402

from jaxasr.audio.features import (  # noqa: E402
    SAMPLE_RATE,
    log_mel_jax,
    log_mel_numpy,
    log_mel_numpy_batch,
    pad_or_trim,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--min-seconds", type=float, default=5.0)
    parser.add_argument("--max-seconds", type=float, default=15.0)
    parser.add_argument("--n-mels", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--jax-batch", type=int, default=8)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    lengths = rng.uniform(args.min_seconds, args.max_seconds, args.clips) * SAMPLE_RATE
    clips = [(0.1 * rng.standard_normal(int(n))).astype(np.float32) for n in lengths]
    padded = np.stack([pad_or_trim(clip) for clip in clips])
    jax_batches = [padded[i : i + args.jax_batch] for i in range(0, args.clips, args.jax_batch)]
    extractor = WhisperFeatureExtractor(feature_size=args.n_mels)
    hf_args = dict(sampling_rate=SAMPLE_RATE, return_tensors="np")

    methods: dict[str, Callable[[], np.ndarray]] = {
        "hf per clip": lambda: np.stack(
            [extractor(clip, **hf_args).input_features[0] for clip in clips]
        ),
        "hf batch": lambda: extractor(clips, **hf_args).input_features,
        "numpy per clip": lambda: np.stack([log_mel_numpy(clip, args.n_mels) for clip in clips]),
        "numpy batch": lambda: log_mel_numpy_batch(clips, args.n_mels),
        "jax batch": lambda: np.concatenate(
            [log_mel_jax(jnp.asarray(batch), args.n_mels) for batch in jax_batches]
        ),
    }

    reference = methods["hf per clip"]()
    for name, method in methods.items():  # warm-up (JAX compiles here) and a parity check
        print(f"{name:15s} max |diff| vs hf: {np.abs(np.asarray(method()) - reference).max():.2e}")

    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, method in methods.items():
            start = time.perf_counter()
            method()
            times[name].append(time.perf_counter() - start)

    print(
        f"\n{args.clips} clips of {args.min_seconds:g}-{args.max_seconds:g} s, "
        f"n_mels={args.n_mels}, best of {args.repeats}, jax on {jax.devices()[0].platform} "
        f"in batches of {args.jax_batch}, torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f}, freed heap memory retained: {RETAINED}"
    )
    rate = {name: args.clips / min(t) for name, t in times.items()}
    for name, t in times.items():
        print(
            f"{name:15s} {rate[name]:8.1f} clips/s (best) {args.clips / np.median(t):8.1f} "
            f"(median) {1e3 * min(t) / args.clips:7.2f} ms/clip (best)"
        )
    hf = max(rate["hf per clip"], rate["hf batch"])
    print(f"ratio numpy/hf: {rate['numpy per clip'] / hf:.1f}x")
    print(f"ratio numpy-batch/hf: {rate['numpy batch'] / hf:.1f}x")
    print(f"ratio jax/hf: {rate['jax batch'] / hf:.1f}x")


if __name__ == "__main__":
    main()
