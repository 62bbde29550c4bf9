"""Tests for jaxasr.audio.tts and the speech fixtures built on it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf

from jaxasr.audio.tts import available_voices, synthesize

from tests.audio.conftest import median_f0, rms

SENTENCE = "Take the amoxicillin twice daily with food."  # 7 words


def _check_speech(audio: np.ndarray, sr: int, min_s: float, max_s: float) -> None:
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert min_s < len(audio) / sr < max_s
    assert np.all(np.abs(audio) <= 1.0)
    assert rms(audio) > 0.02  # clearly not silent (typical speech is ~0.1)
    # Speech has pauses: a good part of the 20 ms frames are much quieter than the loudest.
    frames = audio[: len(audio) // 320 * 320].reshape(-1, 320)
    energy = np.sqrt((frames**2).mean(axis=1))
    assert np.mean(energy < 0.1 * energy.max()) > 0.05


@pytest.mark.parametrize("voice", available_voices())
def test_voices_give_speech(voice: str) -> None:
    _check_speech(synthesize(SENTENCE, voice=voice), 16000, 1.5, 5.0)


def test_voice_list_has_espeak_english() -> None:
    voices = available_voices()
    assert {"espeak:en-us", "espeak:en-gb", "espeak:en-us+f3"} <= set(voices)


@pytest.mark.parametrize("sample_rate", [8000, 16000, 22050, 44100])
def test_sample_rate(sample_rate: int) -> None:
    audio = synthesize(SENTENCE, sample_rate=sample_rate)
    _check_speech(audio, sample_rate, 1.5, 5.0)
    # Same duration whatever the rate: only resampling differs.
    native = synthesize(SENTENCE, sample_rate=22050)
    assert abs(len(audio) / sample_rate - len(native) / 22050) < 0.01


def test_deterministic() -> None:
    first = synthesize(SENTENCE, voice="en-us+klatt")  # klatt also uses espeak's PRNG
    # Other utterances in between must not leak state into the next one.
    synthesize("Something else entirely, at another speed.", voice="en-gb+f2", rate=250)
    assert np.array_equal(first, synthesize(SENTENCE, voice="en-us+klatt"))
    assert np.array_equal(synthesize(SENTENCE), synthesize(SENTENCE, voice="espeak:en-us"))


def test_thread_safe() -> None:
    jobs = [("en-us", 165), ("en-gb+f2", 200), ("en-us+m3", 120)] * 3
    expected = {job: synthesize(SENTENCE, voice=job[0], rate=job[1]) for job in jobs}
    with ThreadPoolExecutor(4) as pool:
        got = pool.map(lambda job: synthesize(SENTENCE, voice=job[0], rate=job[1]), jobs)
        for job, audio in zip(jobs, got):
            assert np.array_equal(audio, expected[job])


def test_rate_changes_duration() -> None:
    slow, normal, fast = (len(synthesize(SENTENCE, rate=r)) for r in (100, 165, 300))
    assert slow > 1.3 * normal and normal > 1.5 * fast


def test_pitch_changes_f0() -> None:
    low = synthesize(SENTENCE, pitch=10)
    high = synthesize(SENTENCE, pitch=90)
    assert median_f0(high) > 1.3 * median_f0(low)
    assert abs(len(high) - len(low)) < 0.1 * len(low)  # pitch alone keeps the timing


def test_voices_differ() -> None:
    us, gb = (synthesize(SENTENCE, voice=v) for v in ("en-us", "en-gb"))
    assert not np.array_equal(us, gb)


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text_raises(text: str) -> None:
    with pytest.raises(ValueError, match="empty"):
        synthesize(text)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"voice": "xx-nonexistent"},
        {"voice": "en-us+nonexistent"},
        {"voice": "nobackend:en-us"},
        {"rate": 10},
        {"rate": 1000},
        {"pitch": 101},
        {"sample_rate": 0},
    ],
)
def test_bad_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        synthesize(SENTENCE, **kwargs)


def test_speech_clips_fixture(speech_clips) -> None:
    assert len(speech_clips) >= 10
    assert len({c.voice for c in speech_clips}) >= 3
    for clip in speech_clips:
        _check_speech(clip.audio, 16000, 2.0, 6.0)
        audio, sr = sf.read(clip.path, dtype="float32")
        assert sr == 16000 and np.array_equal(audio, clip.audio)
        assert clip.text and clip["text"] == clip.text


def test_long_speech_clip_fixture(long_speech_clip) -> None:
    _check_speech(long_speech_clip.audio, 16000, 30.0, 60.0)
    assert len(long_speech_clip.text.split()) > 80
    assert sf.info(long_speech_clip.path).samplerate == 16000
