"""Per-example steps of the host pipeline as Grain map / random-map transforms.

An example is a dict (see `jaxasr.data.sources` for what a source yields). A transform that finds
the example bad does not raise: it returns a skip marker `{"skip": reason, "message", "id"}` and
every later transform passes such a marker through untouched, so the batcher can count it by
reason (`jaxasr.data.errors.REASONS`) instead of the pipeline stopping or silently dropping data.
Examples that carry precomputed encoder outputs (`encoded`) pass the audio steps untouched.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
import zlib
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
import soundfile as sf
import soxr

from jaxasr.audio import augment
from jaxasr.audio.features import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, log_mel_numpy
from jaxasr.audio.io import AudioError, decode_audio_bytes
from jaxasr.data.errors import DataError, is_skip, skip_marker
from jaxasr.data.text import WhisperTargets, corrupt_text, decode_text

Example = dict[str, Any]
MAX_SECONDS = N_SAMPLES / SAMPLE_RATE  # the model's window: 30 s


def skipped(example: Example) -> bool:
    return is_skip(example)


def _guard(fn, example: Example, *args) -> Example:
    if skipped(example):
        return example
    try:
        return fn(example, *args)
    except DataError as e:
        return skip_marker(e, str(example.get("id", "")))


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


def _name(ex: Example) -> str:
    return str(ex.get("id") or "<example>")


@dataclasses.dataclass
class CleanText(_Map):
    """Checks the transcript (UTF-8, not empty) and normalizes its whitespace; runs before the
    audio is decoded so that cheap checks come first."""

    def apply(self, ex: Example) -> Example:
        return {**ex, "text": decode_text(ex.get("text", ""), _name(ex))}


@dataclasses.dataclass
class DecodeAudio(_Map):
    """Encoded bytes or raw samples -> float32 mono at `sample_rate`; validates the samples.

    A rate the example declares must match the encoded file's own rate. `max_seconds=None` lets
    long clips through (multi-scale concatenation or long-form evaluation handles them)."""

    sample_rate: int = SAMPLE_RATE
    max_seconds: float | None = MAX_SECONDS

    def apply(self, ex: Example) -> Example:
        if "encoded" in ex:
            return ex
        name = _name(ex)
        if "audio_bytes" in ex:
            audio = _decode_bytes(ex, name, self.sample_rate)
        elif "audio" in ex:
            audio = _samples(ex, name, self.sample_rate)
        else:
            raise DataError("audio_missing", f"{name}: example has no audio")
        out = {k: v for k, v in ex.items() if k != "audio_bytes"}
        out["audio"] = audio
        out["sample_rate"] = self.sample_rate
        return check_length(out, self.max_seconds)


def check_length(ex: Example, max_seconds: float | None) -> Example:
    """`ex` unchanged, or DataError("audio_too_long") if its audio exceeds `max_seconds`."""
    rate = ex["sample_rate"]
    if max_seconds is not None and len(ex["audio"]) > max_seconds * rate + 1:
        raise DataError("audio_too_long", f"{_name(ex)}: {len(ex['audio']) / rate:.1f} s is longer "
                                          f"than {max_seconds:g} s")
    return ex


@dataclasses.dataclass
class LimitDuration(_Map):
    max_seconds: float = MAX_SECONDS

    def apply(self, ex: Example) -> Example:
        return ex if "encoded" in ex else check_length(ex, self.max_seconds)


def _decode_bytes(ex: Example, name: str, sample_rate: int) -> np.ndarray:
    data = bytes(ex["audio_bytes"])
    try:
        # A record that says 8 kHz over a 16 kHz file is corrupt metadata, not audio to resample.
        return decode_audio_bytes(data, sample_rate, name, declared_rate=int(ex.get("sample_rate") or 0))
    except AudioError as e:
        raise DataError(e.reason, str(e)) from e
    except (sf.SoundFileError, RuntimeError, ValueError, TypeError) as e:  # libsndfile, soxr on odd input
        raise DataError("audio_undecodable", f"{name}: cannot decode audio ({e})") from e


def _samples(ex: Example, name: str, sample_rate: int) -> np.ndarray:
    audio = np.asarray(ex["audio"])
    if audio.ndim == 2:  # [time, channels]
        audio = audio.mean(axis=1)
    if audio.ndim != 1:
        raise DataError("audio_undecodable", f"{name}: audio of shape {audio.shape}")
    rate = int(ex.get("sample_rate") or 0)
    if audio.size == 0:
        raise DataError("audio_empty", f"{name}: no audio samples")
    if audio.dtype == np.int16:  # PCM records: finite by construction
        audio = audio.astype(np.float32)
        audio *= np.float32(1.0 / 32768.0)
    else:
        audio = audio.astype(np.float32, copy=False)
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
        if "audio" not in ex or rng.random() >= self.prob:
            return ex
        factor = float(rng.choice(self.factors))
        if factor == 1.0:
            return ex
        return {**ex, "audio": augment.speed_perturb(ex["audio"], factor, ex["sample_rate"])}


@dataclasses.dataclass
class AddNoise(_RandomMap):
    """Additive noise at an SNR drawn from `snr_db`: from `noise_clips` when given, else coloured
    noise with a spectral exponent drawn from `exponents` (0 white, 1 pink, 2 brown).

    Coloured noise comes from a bank of `loops` seamless loops per exponent (2**19 samples,
    32.8 s, seeded by exponent and loop number, generated on first use in each process); each
    example takes a random window of a random loop. Synthesizing fresh noise for every clip cost
    more than its log-mel; the loops are periodic (made in the FFT domain), so windows that wrap
    around have no seam."""

    prob: float = 0.5
    snr_db: tuple[float, float] = (5.0, 30.0)
    exponents: Sequence[float] = (0.0, 1.0, 2.0)
    noise_clips: Sequence[np.ndarray] = ()
    loops: int = 8

    def apply(self, ex: Example, rng: np.random.Generator) -> Example:
        if "audio" not in ex or rng.random() >= self.prob:
            return ex
        audio = ex["audio"]
        if len(self.noise_clips):
            noise = self.noise_clips[int(rng.integers(len(self.noise_clips)))]
        else:
            noise = _noise_loop(float(rng.choice(self.exponents)), int(rng.integers(self.loops)))
        snr = float(rng.uniform(*self.snr_db))
        return {**ex, "audio": augment.add_noise(audio, noise, snr, rng)}


NOISE_LOOP_SAMPLES = 1 << 19


@functools.lru_cache(maxsize=64)
def _noise_loop(exponent: float, index: int) -> np.ndarray:
    """Loop `index` of coloured noise with spectral exponent `exponent` (read-only; 2 MB)."""
    rng = np.random.default_rng([index, round(1000 * exponent)])
    loop = augment.coloured_noise(NOISE_LOOP_SAMPLES, exponent, rng)
    loop.flags.writeable = False
    return loop


@dataclasses.dataclass
class Gain(_RandomMap):
    prob: float = 0.5
    gain_db: tuple[float, float] = (-6.0, 6.0)

    def apply(self, ex: Example, rng: np.random.Generator) -> Example:
        if "audio" not in ex or rng.random() >= self.prob:
            return ex
        return {**ex, "audio": augment.apply_gain(ex["audio"], float(rng.uniform(*self.gain_db)))}


@dataclasses.dataclass
class LogMel(_Map):
    """Whisper log-mel [n_mels, 3000] of the clip padded to 30 s; keeps the count of real frames."""

    n_mels: int = 80

    def apply(self, ex: Example) -> Example:
        if "encoded" in ex:
            return ex
        audio = ex["audio"]
        out = {k: v for k, v in ex.items() if k != "audio"}
        out["features"] = log_mel_numpy(audio, self.n_mels)
        out["valid_frames"] = min(len(audio) // HOP_LENGTH, N_FRAMES)
        return out


@dataclasses.dataclass
class SpecAugment(_RandomMap):
    """SpecAugment on the real frames only (see `jaxasr.audio.augment.spec_augment`)."""

    prob: float = 1.0
    num_freq_masks: int = 2
    freq_mask_width: int = 27
    num_time_masks: int = 10
    time_mask_width: int = 100
    time_mask_ratio: float = 0.05

    def apply(self, ex: Example, rng: np.random.Generator) -> Example:
        return self.masked(ex, rng)

    def masked(self, ex: Example, rng: np.random.Generator, *, in_place: bool = False) -> Example:
        """`ex` with masked features; `in_place` masks its features array itself (see LogMelSpecAugment)."""
        if "features" not in ex or rng.random() >= self.prob:
            return ex
        features = augment.spec_augment(
            ex["features"], rng, valid_frames=ex.get("valid_frames"),
            num_freq_masks=self.num_freq_masks, freq_mask_width=self.freq_mask_width,
            num_time_masks=self.num_time_masks, time_mask_width=self.time_mask_width,
            time_mask_ratio=self.time_mask_ratio, in_place=in_place)
        return {**ex, "features": features}


@dataclasses.dataclass
class LogMelSpecAugment(_RandomMap):
    """`log_mel` then `spec_augment` as one step, which masks the features `log_mel` has just made
    for this example in place instead of a copy of them (a ~1 MB copy an example less). Given the
    seed SpecAugment would get, the same output as the two steps in a row."""

    log_mel: LogMel
    spec_augment: SpecAugment

    def apply(self, ex: Example, rng: np.random.Generator) -> Example:
        return self.spec_augment.masked(self.log_mel.apply(ex), rng, in_place=True)


def _check_budget(n: int, limit: int | None, reason: str, what: str, name: str) -> None:
    if limit is not None and n > limit:
        raise DataError(reason, f"{name}: {n} {what} exceed the limit of {limit}")


@dataclasses.dataclass
class Tokenize(_Map):
    """Transcript -> decoder inputs, labels and loss mask with Whisper's prompt (see data.text).

    `max_tokens` (the largest label bucket) is checked here so that a long transcript is a
    counted skip and never a batching error; labels are never truncated."""

    targets: WhisperTargets
    max_tokens: int | None = None

    def apply(self, ex: Example) -> Example:
        name = _name(ex)
        text = decode_text(ex.get("text", ""), name)
        encoded = self.targets.encode(text, name)
        _check_budget(len(encoded["labels"]), self.max_tokens, "label_too_long", "decoder tokens", name)
        return {**ex, "text": text, **encoded}


@dataclasses.dataclass
class TextOnly(_Map):
    """A text-only example for speech-LLM adaptation: corrupted transcript tokens in place of audio
    (arXiv 2604.06487), the clean transcript as the target. Corruption is seeded by `seed` and
    the example id, so it is the same on every run and every worker."""

    targets: WhisperTargets
    seed: int = 0
    corrupt: bool = True
    max_tokens: int | None = None
    max_text_tokens: int | None = None

    def apply(self, ex: Example) -> Example:
        name = _name(ex)
        text = decode_text(ex.get("text", ""), name)
        source = corrupt_text(text, derive_seed(self.seed, name)) if self.corrupt else text
        text_tokens = self.targets.encode_text_only(source, name)
        _check_budget(len(text_tokens), self.max_text_tokens, "text_too_long", "text tokens", name)
        encoded = self.targets.encode(text, name)
        _check_budget(len(encoded["labels"]), self.max_tokens, "label_too_long", "decoder tokens", name)
        out = {k: v for k, v in ex.items() if k not in ("audio", "audio_bytes", "sample_rate")}
        return {**out, "text": text, "text_tokens": text_tokens, **encoded}


def derive_seed(seed: int, *names: str | int) -> int:
    """A 32-bit seed for one use of `seed` (a component, a transform), stable across processes."""
    key = ":".join(str(n) for n in (seed, *names))
    return zlib.crc32(key.encode("utf-8"))


class MultiScale(grain.MapDataset):
    """Multi-scale temporal transform: with probability `prob`, draw a target length from
    `scales` (seconds, jittered, at most `max_seconds`) and append the next whole utterances of
    the (shuffled) parent, with `gap_seconds` of silence and their transcripts, while the total
    stays within it. Transcripts are never cut: only whole utterances keep audio and text aligned.
    Seeded per index, so it is deterministic and resumable. Expects decoded, text-checked input.

    The last `2 * max_parts` parent items read are kept (per process, not pickled): index i's
    neighbours are the next indices' own items and neighbours, and decoding each of them again
    cost as much as the rest of the pipeline with FLAC records. Parent items are deterministic,
    so this changes no output; later steps must not modify an item in place (none does)."""

    def __init__(self, parent: grain.MapDataset, *, seed: int, scales: Sequence[float] = (5.0, 10.0, 20.0, 30.0),
                 prob: float = 0.5, gap_seconds: float = 0.2, max_parts: int = 8,
                 max_seconds: float = MAX_SECONDS):
        super().__init__(parent)
        self.seed, self.scales, self.prob = seed, tuple(scales), prob
        self.gap_seconds, self.max_parts, self.max_seconds = gap_seconds, max_parts, max_seconds
        self._new_cache()

    def _new_cache(self) -> None:
        self._recent: collections.OrderedDict[int, Example] = collections.OrderedDict()
        self._recent_lock = threading.Lock()  # Grain's read threads call __getitem__ concurrently

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_recent", "_recent_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._new_cache()

    def _read(self, index: int) -> Example:
        with self._recent_lock:
            if index in self._recent:
                self._recent.move_to_end(index)
                return self._recent[index]
        item = self._parent[index]
        with self._recent_lock:
            self._recent[index] = item
            while len(self._recent) > 2 * self.max_parts:
                self._recent.popitem(last=False)
        return item

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return f"MultiScale(scales={self.scales}, prob={self.prob})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        first = self._read(index)
        rng = np.random.default_rng([self.seed, index])
        if skipped(first) or "audio" not in first or rng.random() >= self.prob:
            return first
        target = min(augment.draw_target_seconds(rng, self.scales), self.max_seconds)
        rate = first["sample_rate"]
        audios, texts = [first["audio"]], [first["text"]]
        total = len(first["audio"]) / rate
        # Neighbours beyond the end come from the next epoch's order (indices wrap in Grain).
        for k in range(1, self.max_parts):
            nxt = self._read(index + k)
            if skipped(nxt):
                continue  # counted when it is reached as an example of its own
            extra = len(nxt["audio"]) / rate + self.gap_seconds
            if total + extra > target:
                break
            audios.append(nxt["audio"])
            texts.append(nxt["text"])
            total += extra
        if len(audios) == 1:
            return first
        audio, text = augment.concat_utterances(audios, texts, self.gap_seconds, rate)
        return {**first, "audio": audio, "text": text, "id": f"{first.get('id', '')}+{len(audios) - 1}",
                "duration": len(audio) / rate}
