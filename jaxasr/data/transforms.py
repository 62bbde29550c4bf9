"""Per-example steps of the host pipeline as Grain map / random-map transforms.

An example is a dict (see `jaxasr.data.sources` for what a source yields). A transform that finds
the example bad does not raise: it returns `{"skip": reason, "message": ...}` and every later
transform passes such a marker through untouched, so the batcher can count it by reason
(`jaxasr.data.errors.REASONS`) instead of the pipeline stopping or silently dropping data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
import soxr

from jaxasr.audio import augment
from jaxasr.audio.features import HOP_LENGTH, N_SAMPLES, SAMPLE_RATE, log_mel_numpy
from jaxasr.audio.io import AudioError, decode_audio_bytes
from jaxasr.data.errors import DataError
from jaxasr.data.text import WhisperTargets, corrupt_text, decode_text

Example = dict[str, Any]


def skipped(example: Example) -> bool:
    return "skip" in example


def _guard(fn, example: Example, *args) -> Example:
    if skipped(example):
        return example
    try:
        return fn(example, *args)
    except DataError as e:
        return {"skip": e.reason, "message": str(e), "id": example.get("id", "")}


class _Map(grain.transforms.Map):
    def map(self, element: Example) -> Example:
        return _guard(self.apply, element)

    def apply(self, example: Example) -> Example:
        raise NotImplementedError


class _RandomMap(grain.transforms.RandomMap):
    def random_map(self, element: Example, rng: np.random.Generator) -> Example:
        return _guard(self.apply, element, rng)

    def apply(self, example: Example, rng: np.random.Generator) -> Example:
        raise NotImplementedError


@dataclasses.dataclass
class DecodeAudio(_Map):
    """Encoded bytes or raw samples -> float32 mono at `sample_rate`; validates the samples.

    `max_seconds=None` lets long clips through (a later crop handles them)."""

    sample_rate: int = SAMPLE_RATE
    max_seconds: float | None = N_SAMPLES / SAMPLE_RATE

    def apply(self, ex: Example) -> Example:
        name = ex.get("id") or "<example>"
        if "audio_bytes" in ex:
            try:
                audio = decode_audio_bytes(ex["audio_bytes"], self.sample_rate, name)
            except AudioError as e:
                reason = ("audio_empty" if "no audio samples" in str(e)
                          else "audio_nonfinite" if "non-finite" in str(e) else "audio_undecodable")
                raise DataError(reason, str(e)) from e
        else:
            audio = _samples(ex, name, self.sample_rate)
        if self.max_seconds is not None and len(audio) > self.max_seconds * self.sample_rate + 1:
            raise DataError("audio_too_long", f"{name}: {len(audio) / self.sample_rate:.1f} s is longer than "
                                              f"{self.max_seconds:g} s")
        out = {k: v for k, v in ex.items() if k != "audio_bytes"}
        out["audio"] = audio
        out["sample_rate"] = self.sample_rate
        return out


def _samples(ex: Example, name: str, sample_rate: int) -> np.ndarray:
    audio = np.asarray(ex["audio"])
    if audio.ndim == 2:  # [time, channels]
        audio = audio.mean(axis=1)
    if audio.dtype == np.int16:
        audio = audio.astype(np.float32) / 32768.0
    audio = audio.astype(np.float32, copy=False)
    rate = int(ex.get("sample_rate") or 0)
    if audio.size == 0:
        raise DataError("audio_empty", f"{name}: no audio samples")
    if not np.isfinite(audio).all():
        raise DataError("audio_nonfinite", f"{name}: non-finite samples (NaN or inf)")
    if not 1000 <= rate <= 384000:
        raise DataError("sample_rate", f"{name}: implausible sample rate {rate}")
    if rate != sample_rate:
        audio = soxr.resample(audio, rate, sample_rate, quality="HQ").astype(np.float32)
    return audio


@dataclasses.dataclass
class SpeedPerturb(_RandomMap):
    """Kaldi-style speed perturbation: one of `factors` with probability `prob`."""

    factors: Sequence[float] = (0.9, 1.0, 1.1)
    prob: float = 1.0

    def apply(self, ex: Example, rng: np.random.Generator) -> Example:
        if rng.random() >= self.prob:
            return ex
        factor = float(rng.choice(self.factors))
        if factor == 1.0:
            return ex
        return {**ex, "audio": augment.speed_perturb(ex["audio"], factor, ex["sample_rate"])}


@dataclasses.dataclass
class AddNoise(_RandomMap):
    """Additive noise at an SNR drawn from `snr_db`: from `noise_clips` when given, else coloured
    noise with a spectral exponent drawn from `exponents` (0 white, 1 pink, 2 brown)."""

    prob: float = 0.5
    snr_db: tuple[float, float] = (5.0, 30.0)
    exponents: Sequence[float] = (0.0, 1.0, 2.0)
    noise_clips: Sequence[np.ndarray] = ()

    def apply(self, ex: Example, rng: np.random.Generator) -> Example:
        if rng.random() >= self.prob:
            return ex
        audio = ex["audio"]
        if len(self.noise_clips):
            noise = self.noise_clips[int(rng.integers(len(self.noise_clips)))]
        else:
            noise = augment.coloured_noise(len(audio), float(rng.choice(self.exponents)), rng)
        snr = float(rng.uniform(*self.snr_db))
        return {**ex, "audio": augment.add_noise(audio, noise, snr, rng)}


@dataclasses.dataclass
class Gain(_RandomMap):
    prob: float = 0.5
    gain_db: tuple[float, float] = (-6.0, 6.0)

    def apply(self, ex: Example, rng: np.random.Generator) -> Example:
        if rng.random() >= self.prob:
            return ex
        return {**ex, "audio": augment.apply_gain(ex["audio"], float(rng.uniform(*self.gain_db)))}


@dataclasses.dataclass
class LogMel(_Map):
    """Whisper log-mel [n_mels, 3000] of the clip padded to 30 s; keeps the count of real frames."""

    n_mels: int = 80

    def apply(self, ex: Example) -> Example:
        audio = ex["audio"]
        out = {k: v for k, v in ex.items() if k != "audio"}
        out["features"] = log_mel_numpy(audio, self.n_mels)
        out["valid_frames"] = min(len(audio) // HOP_LENGTH, N_SAMPLES // HOP_LENGTH)
        return out


@dataclasses.dataclass
class SpecAugment(_RandomMap):
    prob: float = 1.0
    num_freq_masks: int = 2
    freq_mask_width: int = 27
    num_time_masks: int = 10
    time_mask_width: int = 100
    time_mask_ratio: float = 0.05

    def apply(self, ex: Example, rng: np.random.Generator) -> Example:
        if rng.random() >= self.prob:
            return ex
        features = augment.spec_augment(
            ex["features"], rng, valid_frames=ex.get("valid_frames"),
            num_freq_masks=self.num_freq_masks, freq_mask_width=self.freq_mask_width,
            num_time_masks=self.num_time_masks, time_mask_width=self.time_mask_width,
            time_mask_ratio=self.time_mask_ratio)
        return {**ex, "features": features}


@dataclasses.dataclass
class Tokenize(_Map):
    """Transcript -> decoder inputs, labels and loss mask with Whisper's prompt (see data.text)."""

    targets: WhisperTargets

    def apply(self, ex: Example) -> Example:
        name = ex.get("id") or "<example>"
        text = decode_text(ex.get("text", ""), name)
        return {**ex, "text": text, **self.targets.encode(text, name)}


@dataclasses.dataclass
class TextOnly(_Map):
    """A text-only example for speech-LLM adaptation: corrupted transcript tokens in place of audio
    (arXiv 2604.06487), the clean transcript as the target. Corruption is seeded by `seed` and
    the example id, so it is the same on every run and every worker."""

    targets: WhisperTargets
    seed: int = 0
    corrupt: bool = True

    def apply(self, ex: Example) -> Example:
        name = ex.get("id") or "<example>"
        text = decode_text(ex.get("text", ""), name)
        seed = (self.seed * 1_000_003 + _stable_hash(name)) % 2**32
        source = corrupt_text(text, seed) if self.corrupt else text
        out = {k: v for k, v in ex.items() if k not in ("audio", "audio_bytes")}
        return {**out, "text": text, "text_tokens": self.targets.encode_text_only(source),
                **self.targets.encode(text, name)}


def _stable_hash(s: str) -> int:
    import zlib

    return zlib.crc32(s.encode("utf-8"))
