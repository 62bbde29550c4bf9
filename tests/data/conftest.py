"""Data fixtures: ArrayRecord shards and a manifest made from real synthesized speech, plus bad inputs.

Every bad input is one of a kind, its id names the reason the pipeline must give for it
(`BAD_REASONS`), so tests can check each skip is counted under the right code.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from jaxasr.data.records import encode_record, write_shards
from jaxasr.data.text import WhisperTargets

SR = 16000
# id of a bad record -> the reason it must be skipped for
BAD_REASONS = {
    "truncated": "audio_undecodable",
    "random_bytes": "audio_undecodable",
    "zero_length": "audio_empty",
    "nan_samples": "audio_nonfinite",
    "empty_text": "text_empty",
    "not_utf8": "text_not_utf8",
    "bad_rate": "sample_rate",
    "too_long": "audio_too_long",
    "garbage_record": "record_invalid",
}


def _flac(audio: np.ndarray, rate: int = SR) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def _wav(audio: np.ndarray, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, SR, format="WAV", subtype=subtype)
    return buf.getvalue()


def good_example(clip, i: int) -> dict:
    return {"id": f"clip{i:02d}", "audio": clip.audio, "sample_rate": SR, "text": clip.text,
            "domain": "everyday", "language": "en", "speaker": clip.voice, "duration": clip.duration}


def bad_records(clip) -> list[bytes]:
    """One encoded record per entry of BAD_REASONS (in that order)."""
    flac = _flac(clip.audio)
    nan = clip.audio.copy()
    nan[100] = np.nan
    meta = {"text": "a perfectly fine transcript"}
    out = {
        "truncated": encode_record({"id": "truncated", "audio_bytes": flac[: len(flac) // 2], **meta}, "file"),
        "random_bytes": encode_record(
            {"id": "random_bytes", "audio_bytes": np.random.default_rng(0).bytes(4000), **meta}, "file"),
        "zero_length": encode_record({"id": "zero_length", "audio": np.zeros(0, np.int16), "sample_rate": SR,
                                      **meta}, "pcm16"),
        "nan_samples": encode_record({"id": "nan_samples", "audio_bytes": _wav(nan, "FLOAT"), **meta}, "file"),
        "empty_text": encode_record({"id": "empty_text", "audio": clip.audio, "sample_rate": SR, "text": "  \n"},
                                    "flac"),
        "not_utf8": encode_record({"id": "not_utf8", "audio": clip.audio, "sample_rate": SR,
                                   "text": b"caf\xe9 au lait"}, "flac"),
        "bad_rate": encode_record({"id": "bad_rate", "audio": clip.audio, "sample_rate": 200, **meta}, "pcm16"),
        "too_long": encode_record({"id": "too_long", "audio": np.tile(clip.audio, 40)[: 31 * SR],
                                   "sample_rate": SR, **meta}, "pcm16"),
        "garbage_record": b"this is not a jaxasr record at all",
    }
    assert list(out) == list(BAD_REASONS)
    return list(out.values())


@pytest.fixture(scope="session")
def targets(tiny_en_checkpoint) -> WhisperTargets:
    return WhisperTargets(tiny_en_checkpoint.tokenizer, tiny_en_checkpoint.generation_config)


@pytest.fixture(scope="session")
def records_dir(speech_clips, tmp_path_factory) -> Path:
    """All 12 clips as FLAC records in 2 shards (ids clip00..clip11)."""
    out = tmp_path_factory.mktemp("records")
    write_shards([good_example(c, i) for i, c in enumerate(speech_clips)], out, num_shards=2, codec="flac")
    return out


@pytest.fixture(scope="session")
def small_records_dir(speech_clips, tmp_path_factory) -> Path:
    """4 clips (clip00..clip03): a second, smaller dataset."""
    out = tmp_path_factory.mktemp("small_records")
    write_shards([good_example(c, i) for i, c in enumerate(speech_clips[:4])], out, codec="pcm16")
    return out


@pytest.fixture(scope="session")
def bad_records_dir(speech_clips, tmp_path_factory) -> Path:
    """3 good clips (clip00..clip02) followed by every kind of bad input in BAD_REASONS order."""
    out = tmp_path_factory.mktemp("bad_records")
    good = [encode_record(good_example(c, i), "flac") for i, c in enumerate(speech_clips[:3])]
    write_shards(good + bad_records(speech_clips[0]), out, codec="flac")
    return out


@pytest.fixture(scope="session")
def all_bad_records_dir(speech_clips, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("all_bad_records")
    write_shards(bad_records(speech_clips[0]), out, codec="flac")
    return out


@pytest.fixture(scope="session")
def manifest_path(speech_clips, tmp_path_factory) -> Path:
    """JSONL manifest in its own folder: 3 clips by relative path, 1 by absolute path (8 kHz),
    and a missing file, random bytes, an empty WAV, a NaN WAV."""
    root = tmp_path_factory.mktemp("manifest")
    (root / "audio").mkdir()
    rows = []
    for i, clip in enumerate(speech_clips[:3]):
        (root / "audio" / f"c{i}.wav").write_bytes(_wav(clip.audio))
        rows.append({"audio": f"audio/c{i}.wav", "text": clip.text, "id": f"m{i}"})
    import soxr

    slow = soxr.resample(speech_clips[3].audio, SR, 8000)
    sf.write(root / "audio" / "c3_8k.wav", slow, 8000, subtype="PCM_16")
    rows.append({"audio": str(root / "audio" / "c3_8k.wav"), "text": speech_clips[3].text, "id": "m3"})
    (root / "audio" / "noise.wav").write_bytes(np.random.default_rng(1).bytes(3000))
    (root / "audio" / "empty.wav").write_bytes(_wav(np.zeros(0, np.float32)))
    nan = speech_clips[0].audio.copy()
    nan[5] = np.nan
    (root / "audio" / "nan.wav").write_bytes(_wav(nan, "FLOAT"))
    rows += [{"audio": "audio/missing.wav", "text": "gone", "id": "missing"},
             {"audio": "audio/noise.wav", "text": "noise", "id": "noise"},
             {"audio": "audio/empty.wav", "text": "empty", "id": "empty"},
             {"audio": "audio/nan.wav", "text": "nan", "id": "nan"}]
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


MANIFEST_SKIPS = {"audio_missing": 1, "audio_undecodable": 1, "audio_empty": 1, "audio_nonfinite": 1}


@pytest.fixture(scope="session")
def bad_reasons() -> dict[str, str]:
    return dict(BAD_REASONS)


@pytest.fixture(scope="session")
def manifest_skips() -> dict[str, int]:
    return dict(MANIFEST_SKIPS)
