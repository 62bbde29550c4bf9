"""Audio decoding to 16 kHz mono float32: any format libsndfile reads (wav, flac, ogg, mp3...)."""

import io
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr


class AudioError(ValueError):
    """Audio that cannot be turned into samples; the message names the file and the reason.

    `reason` is the data pipeline's skip code for it (see `jaxasr.data.errors.REASONS`):
    audio_missing, audio_undecodable, audio_empty, audio_nonfinite or sample_rate."""

    def __init__(self, message: str, reason: str = "audio_undecodable"):
        super().__init__(message)
        self.reason = reason


def load_audio(path: str | os.PathLike, sample_rate: int = 16000) -> np.ndarray:
    """Decode the file at `path` to mono float32 at `sample_rate`."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: {'not a regular file' if path.exists() else 'no such file'}", "audio_missing")
    return _decode(path, sample_rate, str(path))


def decode_audio_bytes(data: bytes, sample_rate: int = 16000, name: str = "<bytes>",
                       declared_rate: int | None = None) -> np.ndarray:
    """Decode an in-memory audio file to mono float32 at `sample_rate`; `name` labels errors.
    With `declared_rate`, a file at any other rate is an error (the metadata is wrong)."""
    return _decode(io.BytesIO(data), sample_rate, name, declared_rate)


def _decode(source: Path | BinaryIO, sample_rate: int, name: str, declared_rate: int | None = None) -> np.ndarray:
    try:
        samples, rate = sf.read(source, dtype="float32", always_2d=True)
    except sf.SoundFileError as e:  # unknown format, corrupt stream...
        reason = " ".join(getattr(e, "error_string", str(e)).split())  # keep it one line
        raise AudioError(f"{name}: cannot decode audio ({reason})") from e
    if declared_rate and rate != declared_rate:
        raise AudioError(f"{name}: declared {declared_rate} Hz but the audio is {rate} Hz", "sample_rate")
    if samples.size == 0:
        raise AudioError(f"{name}: no audio samples", "audio_empty")
    if not np.isfinite(samples).all():
        raise AudioError(f"{name}: non-finite samples (NaN or inf)", "audio_nonfinite")
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)
