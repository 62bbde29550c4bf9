"""Host-side (NumPy) audio and log-mel augmentation: pure functions.

Every random function takes an explicit ``np.random.Generator``, so a seed fixes the output, and
every function returns a new float32 array without touching its input. Audio is mono float32 at
16 kHz unless stated. The data pipeline wraps these in Grain transforms and draws their
parameters from its config.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import ducc0
import numpy as np
import scipy.fft
import soxr

from jaxasr.kernels import audio as audio_kernels

__all__ = [
    "add_noise",
    "apply_gain",
    "coloured_noise",
    "concat_utterances",
    "draw_target_seconds",
    "random_crop",
    "spec_augment",
    "speed_perturb",
]

SAMPLE_RATE = 16000
# Frames in a 30 s Whisper window (10 ms hop); kept here rather than imported from
# features.py, which imports JAX, so that host workers stay NumPy-only.
_FULL_WINDOW_FRAMES = 3000
_PEAK_TARGET = 0.99


def _f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def speed_perturb(audio: np.ndarray, factor: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Kaldi-style speed perturbation: tempo and pitch both scale by ``factor``.

    The samples are reinterpreted as recorded at ``sample_rate * factor`` and resampled back to
    ``sample_rate``, so the output has about ``len(audio) / factor`` samples: with the native
    windowed-sinc kernel (`jaxasr.kernels.audio`; see its response there) where it is built, else soxr.
    """
    if factor <= 0:
        raise ValueError(f"speed factor must be positive, got {factor}")
    audio = _f32(audio)
    if factor == 1.0 or audio.size == 0:
        return audio.copy()
    if audio_kernels.available():  # windowed sinc, 3-4x faster than soxr here
        return audio_kernels.resample(audio, sample_rate * factor, sample_rate)
    return _f32(soxr.resample(audio, sample_rate * factor, sample_rate, quality="HQ"))


def coloured_noise(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of Gaussian noise with power spectrum ~ 1/f**exponent (0 white, 1 pink, 2 brown).

    Every Gaussian here comes from Box-Muller on two uniforms (radius sqrt(-2 ln u1), phase
    2 pi u2): NumPy's own normals took 2.2-2.6 ms per 10 s of audio on this project's CPU, the
    uniforms and the transcendentals ~1 ms. White noise uses both the cosine and the sine of each
    pair. Coloured noise is synthesized in the rFFT domain: each bin above DC gets one complex
    Gaussian (the pair) scaled by f**(-exponent/2), then the inverse FFT (ducc0, ~1.5x faster than
    SciPy's here); that is the same distribution as shaping white noise, without its forward FFT.
    The FFT runs at the next fast length and is cropped: a clip's length after speed perturbation
    often has large prime factors, where an exact-length FFT was measured 10-30x slower. The result
    is zero-mean with unit RMS. Fewer than 2 samples give zeros.
    """
    if n < 2:
        return np.zeros(n, np.float32)
    if exponent == 0:
        radius, phase = _box_muller((n + 1) // 2, rng)
        noise = np.concatenate([radius * np.cos(phase), radius * np.sin(phase)])[:n]
    else:
        m = scipy.fft.next_fast_len(n, real=True)
        bins = m // 2 + 1
        freq = np.arange(bins, dtype=np.float32)
        freq[0] = 1.0  # DC is zeroed below; 1 avoids a division by zero
        freq *= np.float32(1.0 / m)
        amplitude = np.power(freq, np.float32(-exponent / 2.0), out=freq)
        amplitude[0] = 0.0
        radius, phase = _box_muller(bins, rng)
        amplitude *= radius
        spectrum = np.empty(bins, np.complex64)
        spectrum.real = amplitude * np.cos(phase)
        spectrum.imag = amplitude * np.sin(phase)
        # unnormalized inverse (scaled by m): the unit-RMS normalization below removes the scale
        noise = ducc0.fft.c2r(spectrum, axes=(0,), lastsize=m, forward=False)[:n]
    noise -= noise.mean(dtype=np.float64)
    rms = np.sqrt(np.dot(noise, noise) / n)
    if rms == 0:
        return np.zeros(n, np.float32)
    noise *= np.float32(1.0 / rms)  # in place, in float32: a float64 quotient cost 0.26 ms per 10 s
    return noise


def _box_muller(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Radius and phase of `count` standard complex-Gaussian pairs (float32)."""
    u1, u2 = rng.random((2, count), dtype=np.float32)
    radius = np.sqrt(np.float32(-2.0) * np.log1p(-u1))  # 1 - u1 > 0
    u2 *= np.float32(2.0 * np.pi)
    return radius, u2


def _noise_segment(noise: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of ``noise``: a random window if longer, else tiled from a random offset."""
    if len(noise) >= n:
        start = int(rng.integers(0, len(noise) - n + 1))
        return noise[start : start + n]
    start = int(rng.integers(0, len(noise)))
    return noise[(start + np.arange(n)) % len(noise)]


def add_noise(
    audio: np.ndarray, noise: np.ndarray, snr_db: float, rng: np.random.Generator
) -> np.ndarray:
    """Mix ``noise`` into ``audio`` at signal-to-noise ratio ``snr_db``.

    Signal power is measured on ``audio``, noise power on the segment used. All-silent audio (no
    SNR to keep) or all-silent noise is returned unchanged. If the mixture peaks above 1 it is
    scaled down to a 0.99 peak.
    """
    audio = _f32(audio)
    noise = _f32(noise)
    if noise.size == 0:
        raise ValueError("noise is empty")
    if audio.size == 0:
        return audio.copy()
    signal_power = _power(audio)
    segment = _noise_segment(noise, len(audio), rng)
    noise_power = _power(segment)
    if signal_power == 0 or noise_power == 0:
        return audio.copy()
    scale = np.sqrt(signal_power / (noise_power * 10.0 ** (snr_db / 10.0)))
    mixed = segment * np.float32(scale)
    mixed += audio
    peak = max(float(mixed.max()), -float(mixed.min()))  # no |mixed| temporary
    if peak > 1.0:
        # Scale the whole mixture rather than clip: clipping would distort the speech and change
        # the SNR; a uniform gain keeps the SNR exact. 0.99 leaves headroom for 16-bit rounding.
        mixed *= np.float32(_PEAK_TARGET / peak)
    return mixed


def _power(x: np.ndarray) -> float:
    """Mean square of a float32 signal (BLAS dot: float32 partial sums, ample for an SNR)."""
    return float(np.dot(x, x)) / len(x)


def apply_gain(audio: np.ndarray, gain_db: float) -> np.ndarray:
    """Scale ``audio`` by ``gain_db`` decibels, clipped to [-1, 1]."""
    out = _f32(audio) * np.float32(10.0 ** (gain_db / 20.0))  # float32 throughout: a new array
    return np.clip(out, -1.0, 1.0, out=out)


def spec_augment(
    log_mel: np.ndarray,
    rng: np.random.Generator,
    *,
    valid_frames: int | None = None,
    num_freq_masks: int = 2,
    freq_mask_width: int = 27,
    num_time_masks: int = 10,
    time_mask_width: int = 100,
    time_mask_ratio: float = 0.05,
    mask_value: float | None = None,
    in_place: bool = False,
) -> np.ndarray:
    """SpecAugment on a log-mel ``[n_mels, frames]`` with length-adaptive time masks.

    Only the first ``valid_frames`` frames (the real audio; default all) are touched, so the
    padding of a 30 s Whisper window looks the same as at inference. Frequency masks: width
    uniform in [0, freq_mask_width], across the valid frames. Time masks follow the adaptive rule
    of Park et al. 2020 ("SpecAugment on large scale datasets"), with ``T = valid_frames``:

    * max width ``W = min(time_mask_width, floor(time_mask_ratio * T))``; each width is uniform in
      [0, W];
    * count ``min(num_time_masks, ceil(num_time_masks * T / 3000))``: the full count for a 30 s
      clip, proportionally fewer (at least one) for shorter ones.

    So a 30 s clip gets 10 masks of up to 100 frames, a 2 s clip (200 frames) one mask of up to
    10 frames. Masked cells take ``mask_value``, by default the mean of the valid region.
    Returns a masked copy, or with ``in_place`` masks ``log_mel`` itself (writable float32).
    """
    if in_place:
        if log_mel.dtype != np.float32 or not log_mel.flags.writeable:
            what = f"{'' if log_mel.flags.writeable else 'read-only '}{log_mel.dtype}"
            raise ValueError(f"in-place SpecAugment needs a writable float32 array, got a {what} one")
        spec = log_mel
    else:
        spec = np.array(log_mel, dtype=np.float32)  # copy
    if spec.ndim != 2:
        raise ValueError(f"expected [n_mels, frames], got shape {spec.shape}")
    n_mels, frames = spec.shape
    valid = frames if valid_frames is None else int(valid_frames)
    if not 0 <= valid <= frames:
        raise ValueError(f"valid_frames={valid_frames} outside [0, {frames}]")
    if valid == 0:
        return spec
    region = spec[:, :valid]  # a view: masking it masks spec
    fill = np.float32(region.mean() if mask_value is None else mask_value)

    for _ in range(num_freq_masks):
        width = int(rng.integers(0, min(freq_mask_width, n_mels) + 1))
        start = int(rng.integers(0, n_mels - width + 1))
        region[start : start + width, :] = fill

    max_width = min(time_mask_width, int(time_mask_ratio * valid))
    count = min(num_time_masks, math.ceil(num_time_masks * valid / _FULL_WINDOW_FRAMES))
    for _ in range(count):
        width = int(rng.integers(0, max_width + 1))
        start = int(rng.integers(0, valid - width + 1))
        region[:, start : start + width] = fill
    return spec


def draw_target_seconds(
    rng: np.random.Generator,
    scales: Sequence[float] = (5.0, 10.0, 20.0, 30.0),
    jitter: float = 0.2,
) -> float:
    """A target clip length: a scale picked uniformly, jittered by up to ±``jitter`` (relative),
    clamped to [1, 30] seconds."""
    scale = float(scales[int(rng.integers(0, len(scales)))])
    seconds = scale * float(rng.uniform(1.0 - jitter, 1.0 + jitter))
    return min(max(seconds, 1.0), 30.0)


def random_crop(audio: np.ndarray, max_samples: int, rng: np.random.Generator) -> np.ndarray:
    """A random window of ``max_samples`` samples; a copy of ``audio`` if it is no longer."""
    audio = _f32(audio)
    if len(audio) <= max_samples:
        return audio.copy()
    start = int(rng.integers(0, len(audio) - max_samples + 1))
    return audio[start : start + max_samples].copy()


def concat_utterances(
    audios: Sequence[np.ndarray],
    texts: Sequence[str],
    gap_seconds: float = 0.2,
    sample_rate: int = SAMPLE_RATE,
) -> tuple[np.ndarray, str]:
    """Join whole utterances with ``gap_seconds`` of silence between them, and their transcripts
    with single spaces (empty transcripts are skipped)."""
    if len(audios) != len(texts):
        raise ValueError(f"{len(audios)} audios but {len(texts)} texts")
    if not audios:
        return np.zeros(0, np.float32), ""
    gap = np.zeros(round(gap_seconds * sample_rate), np.float32)
    parts: list[np.ndarray] = []
    for i, a in enumerate(audios):
        if i:
            parts.append(gap)
        parts.append(_f32(a))
    text = " ".join(t.strip() for t in texts if t.strip())
    return np.concatenate(parts), text
