"""Native host-side audio kernels (`audio_kernels.cc`, through ctypes; no JAX): Whisper's log-mel
and windowed-sinc resampling for speed perturbation.

Why: they are the data pipeline's per-example hot spots on CPU hosts. The NumPy log-mel spent
more time in Python and memory passes around its FFT calls than in them; soxr took ~14 ns per
sample for a speed perturbation at any quality setting. Built on first use with the system C++
compiler (`jaxasr.kernels.build`) and cached; the callers keep their NumPy/soxr path for when the
build fails (a warning says why) or `JAXASR_AUDIO_KERNELS=0`. ctypes releases the GIL during a
call, so clips on several threads run in parallel.
"""

from __future__ import annotations

import ctypes
import functools
from fractions import Fraction
from pathlib import Path

import numpy as np

from jaxasr.kernels.build import load_library

SOURCE = Path(__file__).with_name("audio_kernels.cc")
_F32 = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
_I64 = ctypes.c_int64


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernels, or None (with a warning saying why) where they cannot be used."""
    lib = load_library(SOURCE, what="jaxasr audio kernels", switch="JAXASR_AUDIO_KERNELS",
                       fallback="NumPy and soxr")
    return None if lib is None else declare(lib)


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """`lib` (a build of SOURCE) with its entry points' argument types set."""
    lib.jaxasr_log_mel.argtypes = [_F32, _I64, _I64, _F32, ctypes.c_int, _F32, _I64, _I64]
    lib.jaxasr_resample.argtypes = [_F32, _I64, ctypes.c_int, ctypes.c_int, _F32, ctypes.c_int, _F32, _I64]
    return lib


def available() -> bool:
    return library() is not None


def _require() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError("jaxasr's audio kernels are not available here; check `available()` first")
    return lib


def log_mel_into(audio: np.ndarray, padding: int, filters: np.ndarray, out: np.ndarray, n_active: int) -> None:
    """Whisper log-mel of `audio` (float32, contiguous) into `out` [n_mels, frames] (see
    `jaxasr.audio.features`); `filters` is the float32 bank [n_mels, 201]."""
    lib = _require()
    n_mels, n_out = out.shape
    if lib.jaxasr_log_mel(audio, len(audio), padding, filters, n_mels, out, n_out, n_active):
        raise ValueError(f"log-mel: bad arguments (padding {padding}, {n_active} of {n_out} frames)")


# Filter length in input samples per output sample. With the Kaiser window and cutoff below,
# measured on sines (factors 0.9 and 1.1): flat within 0.01 dB up to 0.8 of the lower rate's
# Nyquist frequency (6 kHz here), -0.5 dB at 0.875, -1.5 dB at 0.9; an input tone landing at 1.05
# of the output's Nyquist comes through at -63 dB, at 1.125 at -85 dB. (torchaudio's default
# resampler, which ASR toolkits use for speed perturbation, spans 6 zero crossings a side.)
TAPS = 48
KAISER_BETA = 8.0
ROLLOFF = 0.94


@functools.lru_cache(maxsize=32)
def resample_phases(up: int, down: int, taps: int = TAPS) -> np.ndarray:
    """Filter phases [up, taps] for output/input rate `up`/`down`: phase p holds the windowed-sinc
    weights of the `taps` inputs around an output that falls p/up of a sample after an input."""
    cutoff = ROLLOFF * min(1.0, up / down)  # of the input's Nyquist: anti-aliasing when shrinking
    offset = np.arange(taps) - (taps // 2 - 1)  # input k sits at floor(t) + offset[k]
    tau = np.arange(up)[:, None] / up - offset[None, :]  # output time minus input time
    window = np.i0(KAISER_BETA * np.sqrt(np.clip(1.0 - (tau / (taps / 2)) ** 2, 0.0, 1.0))) / np.i0(KAISER_BETA)
    phases = (cutoff * np.sinc(cutoff * tau) * window).astype(np.float32)
    phases.flags.writeable = False
    return phases


def resample(x: np.ndarray, in_rate: float, out_rate: float, max_denominator: int = 1000) -> np.ndarray:
    """`x` (float32) resampled from `in_rate` to `out_rate`, the ratio taken as a fraction with a
    denominator of at most `max_denominator` (0.9 -> 10/9); len(x) * ratio samples, rounded half up."""
    lib = _require()
    ratio = Fraction(out_rate / in_rate).limit_denominator(max_denominator)
    up, down = ratio.numerator, ratio.denominator
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.empty(int(len(x) * up / down + 0.5), np.float32)  # half up, as soxr
    lib.jaxasr_resample(x, len(x), up, down, resample_phases(up, down), TAPS, y, len(y))
    return y
