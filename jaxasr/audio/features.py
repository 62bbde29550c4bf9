"""Whisper log-mel spectrogram: a NumPy version for the host and a jittable JAX version.

Both reproduce `transformers.WhisperFeatureExtractor` with its defaults (no dither, no
normalization): pad/trim to 30 s, centered STFT (periodic Hann window, reflect padding)
without its last frame, power spectrum, Slaney mel filters, log10 clamped at 1e-10, floor at
the clip's maximum minus 8, then (x + 4) / 4.
"""

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np
import ducc0
import scipy.sparse

from jaxasr.kernels import audio as audio_kernels

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000

_PAD = N_FFT // 2  # centering pad on each side
_N_BINS = N_FFT // 2 + 1
_CHUNK = 256  # frames per FFT call


def _hertz_to_mel(freq: np.ndarray) -> np.ndarray:
    """Slaney mel scale, linear below 1 kHz and logarithmic above, as transformers computes it."""
    mels = 3.0 * freq / 200.0
    log_region = freq >= 1000.0
    mels[log_region] = 15.0 + np.log(freq[log_region] / 1000.0) * (27.0 / np.log(6.4))
    return mels


def _mel_to_hertz(mels: np.ndarray) -> np.ndarray:
    freq = 200.0 * mels / 3.0
    log_region = mels >= 15.0
    freq[log_region] = 1000.0 * np.exp(np.log(6.4) / 27.0 * (mels[log_region] - 15.0))
    return freq


@lru_cache
def mel_filters(n_mels: int) -> np.ndarray:
    """Slaney-normalized mel filter bank, float64 [N_FFT // 2 + 1, n_mels].

    Bit-identical to `transformers.audio_utils.mel_filter_bank` as WhisperFeatureExtractor
    calls it (fmin 0, fmax 8 kHz). Cached, so the array is read-only.
    """
    mel_range = _hertz_to_mel(np.array([0.0, 8000.0]))
    filter_freqs = _mel_to_hertz(np.linspace(mel_range[0], mel_range[1], n_mels + 2))
    fft_freqs = np.linspace(0, SAMPLE_RATE // 2, _N_BINS)
    filter_diff = np.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    down_slopes = -slopes[:, :-2] / filter_diff[:-1]
    up_slopes = slopes[:, 2:] / filter_diff[1:]
    filters = np.maximum(0.0, np.minimum(down_slopes, up_slopes))
    filters *= 2.0 / (filter_freqs[2 : n_mels + 2] - filter_freqs[:n_mels])
    filters.flags.writeable = False
    return filters


@lru_cache
def _mel_filters_t32(n_mels: int) -> np.ndarray:
    """[n_mels, bins] float32, for the JAX matmul and the native kernel."""
    filters = np.ascontiguousarray(mel_filters(n_mels).T, dtype=np.float32)
    filters.flags.writeable = False
    return filters


@lru_cache
def _mel_filters_sparse(n_mels: int) -> scipy.sparse.csr_array:
    """[n_mels, bins] float32 CSR: each bin feeds at most two filters, so this is ~20x less
    work than a dense matmul, and it stays off multithreaded BLAS, which on small CPU hosts
    spins threads that slow the FFT down."""
    return scipy.sparse.csr_array(_mel_filters_t32(n_mels))


@lru_cache
def _hann_window() -> np.ndarray:
    """Periodic Hann window, as torch.hann_window(N_FFT)."""
    window = (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)
    window.flags.writeable = False
    return window


def pad_or_trim(audio: np.ndarray, length: int = N_SAMPLES) -> np.ndarray:
    """Float32 copy of `audio` zero-padded or cut to `length` samples."""
    out = np.zeros(length, np.float32)
    n = min(len(audio), length)
    out[:n] = audio[:n]
    return out


def _active_frames(n_audio: int, padding: int) -> int:
    """How many leading frames can be non-zero; the others lie wholly in the zero padding.

    Frame t covers samples [t * HOP_LENGTH - _PAD, t * HOP_LENGTH + _PAD) of the clip. When
    the audio reaches the right reflect padding this gives every frame, so none is wrongly
    skipped.
    """
    return min(padding // HOP_LENGTH, -(-(n_audio + _PAD) // HOP_LENGTH))


def _segment(audio: np.ndarray, padding: int, lo: int, hi: int, buf: np.ndarray) -> np.ndarray:
    """Samples [lo, hi) of the signal the STFT frames: `audio` (n samples) zero-padded to
    `padding` samples, then reflect-padded by _PAD on each side as torch.stft does.

    A view of `audio` where [lo, hi) lies inside it (no copy: fresh page-sized buffers cost
    more than the FFT on small hosts), else written into `buf`.
    """
    n = len(audio)
    if 0 <= lo and hi <= n:
        return audio[lo:hi]
    seg = buf[: hi - lo]
    seg.fill(0.0)
    a, b = max(lo, 0), min(hi, n)
    if b > a:
        seg[a - lo : b - lo] = audio[a:b]
    reflected = min(-lo, n - 1)  # left edge: position -m holds sample m
    if reflected > 0:
        seg[-lo - reflected : -lo] = audio[reflected:0:-1]
    first = max(lo, padding, 2 * padding - 1 - n)  # right edge: position j holds 2 * padding - 2 - j
    if hi > first:
        seg[first - lo :] = audio[2 * padding - 1 - hi : 2 * padding - 1 - first][::-1]
    return seg


def _log_mel_into(audio: np.ndarray, padding: int, out: np.ndarray) -> None:
    """Write one clip's features into `out` [n_mels, padding // HOP_LENGTH]: with the native
    kernel (`jaxasr.kernels.audio`, 3-4x faster) where it is built, else with NumPy."""
    audio = np.ascontiguousarray(audio[:padding], dtype=np.float32)
    n_active = _active_frames(len(audio), padding)
    if audio_kernels.available():
        audio_kernels.log_mel_into(audio, padding, _mel_filters_t32(out.shape[0]), out, n_active)
    else:
        _log_mel_into_numpy(audio, padding, out, n_active)


def _log_mel_into_numpy(audio: np.ndarray, padding: int, out: np.ndarray, n_active: int) -> None:
    n_mels, n_frames = out.shape
    mel = out[:, :n_active]
    segment_buf = np.empty((_CHUNK - 1) * HOP_LENGTH + N_FFT, np.float32)
    spectrum_buf = np.empty((_N_BINS, _CHUNK), np.complex64)
    # _CHUNK frames at a time: the buffers stay in L2 and are reused. Whole-clip arrays
    # measured 2x slower; much smaller chunks hold the GIL longer per frame (Python overhead),
    # which stops the batch version's threads from scaling.
    for start in range(0, n_active, _CHUNK):
        n = min(_CHUNK, n_active - start)
        segment = _segment(audio, padding, start * HOP_LENGTH - _PAD, (start + n - 1) * HOP_LENGTH + _PAD, segment_buf)
        # Frames as columns: the FFT then writes [bins, frames], which the sparse mel matmul
        # reads row by row and which is already the output layout.
        frames = np.ndarray((N_FFT, n), np.float32, segment, 0, (4, 4 * HOP_LENGTH))
        spectrum = ducc0.fft.r2c(frames * _hann_window()[:, None], axes=(0,), out=spectrum_buf[:, :n])
        power = np.square(spectrum.real)
        power += np.square(spectrum.imag)
        mel[:, start : start + n] = _mel_filters_sparse(n_mels) @ power
    # The max - 8 floor in the power domain (log10 is monotonic): one pass fewer. Skipped
    # frames are all zero, i.e. at the 1e-10 clamp, and count towards the clip's maximum.
    peak = mel.max(initial=0.0 if n_active < n_frames else -np.inf)
    clamp = max(peak * 1e-8, 1e-10)
    np.log10(np.maximum(mel, clamp, out=mel), out=mel)
    mel += 4.0
    mel /= 4.0
    out[:, n_active:] = (np.log10(np.float32(clamp)) + 4.0) / 4.0


def log_mel_numpy(audio: np.ndarray, n_mels: int = 80, padding: int = N_SAMPLES) -> np.ndarray:
    """Log-mel features float32 [n_mels, padding // HOP_LENGTH] of one 16 kHz mono clip.

    Single-threaded: parallelize across clips with processes (data-loader workers).
    """
    features = np.empty((n_mels, padding // HOP_LENGTH), np.float32)
    _log_mel_into(audio, padding, features)
    return features


def log_mel_numpy_batch(
    audios: Sequence[np.ndarray], n_mels: int = 80, padding: int = N_SAMPLES, threads: int | None = None
) -> np.ndarray:
    """Log-mel features float32 [B, n_mels, padding // HOP_LENGTH] of several clips.

    Clip by clip (one big FFT over all clips' frames measured slower, as its buffers spill out
    of cache), on `threads` threads (default: the cores this process may use; 1 inside data-loader
    worker processes): the FFT, the sparse mel matmul and the ufuncs release the GIL, and
    256-frame chunks keep the Python work that holds it small (2 threads: 1.7x one).
    """
    features = np.empty((len(audios), n_mels, padding // HOP_LENGTH), np.float32)
    threads = min(len(audios), threads or usable_cores())
    if threads <= 1:
        for audio, out in zip(audios, features):
            _log_mel_into(audio, padding, out)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda i: _log_mel_into(audios[i], padding, features[i]), range(len(audios))))
    return features


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@partial(jax.jit, static_argnames="n_mels")
def log_mel_jax(audio: jax.Array, n_mels: int = 80) -> jax.Array:
    """Log-mel features float32 [B, n_mels, T // HOP_LENGTH] of padded clips [B, T].

    T is normally N_SAMPLES (see `pad_or_trim`); every frame is computed, as shapes are static.
    """
    n_frames = audio.shape[1] // HOP_LENGTH
    padded = jnp.pad(audio.astype(jnp.float32), ((0, 0), (_PAD, _PAD)), mode="reflect")
    # A gather with iota indices: on CPU it beat reshape-and-concatenate framing by 3x.
    starts = jnp.arange(n_frames) * HOP_LENGTH
    frames = padded[:, starts[:, None] + jnp.arange(N_FFT)]
    spectrum = jnp.fft.rfft(frames * _hann_window(), axis=-1)
    power = spectrum.real**2 + spectrum.imag**2
    # HIGHEST keeps float32 on GPUs/TPUs, whose default (TF32/bf16) breaks parity.
    mel = jnp.einsum(
        "mk,bfk->bmf", _mel_filters_t32(n_mels), power, precision=jax.lax.Precision.HIGHEST
    )
    log_spec = jnp.log10(jnp.maximum(mel, 1e-10))
    log_spec = jnp.maximum(log_spec, log_spec.max(axis=(1, 2), keepdims=True) - 8.0)
    return (log_spec + 4.0) / 4.0
