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
import scipy.fft
import scipy.sparse

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000

_PAD = N_FFT // 2  # centering pad on each side
_N_BINS = N_FFT // 2 + 1
_LOG_ZERO = np.float32(-10.0)  # log10 of the 1e-10 clamp: the value of an all-zero frame
_CHUNK = 128  # frames per FFT call


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
    """[n_mels, bins] float32, for the JAX matmul."""
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


def _frames(audio: np.ndarray, padding: int) -> np.ndarray:
    """Strided view [N_FFT, n] whose columns are the centered STFT frames that can be non-zero.

    Frames lying wholly in the zero padding have a zero spectrum, so their log-mel is known
    without computing it; skipping them makes a clip's cost proportional to its length.
    """
    n_audio = min(len(audio), padding)
    n_frames = padding // HOP_LENGTH
    # Frame t covers samples [t * HOP_LENGTH - _PAD, t * HOP_LENGTH + _PAD). When the audio
    # reaches the right reflect padding this gives n_frames, so no frame is wrongly skipped.
    n_active = min(n_frames, -(-(n_audio + _PAD) // HOP_LENGTH))
    span = (n_active - 1) * HOP_LENGTH + N_FFT  # samples of the centered signal they cover
    padded = np.zeros(span, np.float32)
    n_copy = min(n_audio, span - _PAD)
    padded[_PAD : _PAD + n_copy] = audio[:n_copy]
    padded[:_PAD] = padded[2 * _PAD : _PAD : -1]  # reflect padding, as torch.stft
    right = span - _PAD - padding
    if right > 0:
        end = _PAD + padding
        padded[end:] = padded[end - 2 : end - 2 - right : -1]
    # Frames as columns: the FFT then writes [bins, n], which the sparse mel matmul reads
    # row by row and which is already the output layout.
    return np.lib.stride_tricks.as_strided(
        padded, (N_FFT, n_active), (padded.itemsize, HOP_LENGTH * padded.itemsize), writeable=False
    )


def _log_mel_into(audio: np.ndarray, padding: int, out: np.ndarray) -> None:
    """Write one clip's features into `out` [n_mels, padding // HOP_LENGTH]."""
    n_mels, n_frames = out.shape
    frames = _frames(audio, padding)
    log_mel = out[:, : frames.shape[1]]
    # A few frames at a time: the buffers stay in cache and under malloc's mmap threshold,
    # which measured 2x faster than whole-clip arrays.
    for start in range(0, frames.shape[1], _CHUNK):
        windowed = frames[:, start : start + _CHUNK] * _hann_window()[:, None]
        spectrum = scipy.fft.rfft(windowed, axis=0, overwrite_x=True)
        power = spectrum.real**2
        power += spectrum.imag**2
        log_mel[:, start : start + _CHUNK] = _mel_filters_sparse(n_mels) @ power
    np.log10(np.maximum(log_mel, 1e-10, out=log_mel), out=log_mel)
    # Skipped frames are all zero, i.e. _LOG_ZERO; they count towards the clip's maximum.
    peak = log_mel.max() if log_mel.shape[1] == n_frames else max(log_mel.max(), _LOG_ZERO)
    floor = peak - 8.0
    np.maximum(log_mel, floor, out=log_mel)
    log_mel += 4.0
    log_mel /= 4.0
    out[:, log_mel.shape[1] :] = (max(floor, _LOG_ZERO) + 4.0) / 4.0


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
    worker processes): the FFT, the sparse mel matmul and the ufuncs release the GIL.
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
