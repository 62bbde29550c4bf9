"""Whisper log-mel front end (parity with transformers' WhisperFeatureExtractor), audio loading."""

import numpy as np
import pytest
import soundfile as sf
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import mel_filter_bank

from jaxasr.audio.features import (
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    log_mel_jax,
    log_mel_numpy,
    log_mel_numpy_batch,
    mel_filters,
    pad_or_trim,
)
from jaxasr.audio.io import AudioError, decode_audio_bytes, load_audio

# HF runs in float32 too: on speech its own error against a float64 computation reaches
# ~7e-5, so no float32 implementation can be held much tighter than this.
TOLERANCE = 1e-4


def _speech_like(seconds: float, seed: int) -> np.ndarray:
    """Deterministic stand-in for speech: voiced syllables (harmonics of a wandering pitch
    shaped by two moving formants) separated by pauses, over low background noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = 110 + 40 * np.sin(2 * np.pi * 0.6 * t + rng.uniform(0, 2 * np.pi))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    f1 = 600 + 200 * np.sin(2 * np.pi * 2.3 * t)
    f2 = 1600 + 500 * np.sin(2 * np.pi * 1.7 * t + 1.0)
    voice = np.zeros_like(t)
    for k in range(1, 31):
        gain = np.exp(-(((k * f0 - f1) / 150) ** 2)) + 0.5 * np.exp(-(((k * f0 - f2) / 250) ** 2))
        voice += (gain + 0.02) * np.sin(k * phase)
    # Syllables of ~0.25 s, a third of them silent, with 20 ms fades.
    on = rng.random(int(seconds * 4) + 1) > 0.33
    gate = np.repeat(on, SAMPLE_RATE // 4)[: len(t)]
    envelope = np.convolve(gate, np.hanning(320) / 160, "same")
    audio = 0.3 * envelope * voice / np.abs(voice).max() + 0.002 * rng.standard_normal(len(t))
    return audio.astype(np.float32)


@pytest.fixture(scope="module")
def speech_like_clips() -> list[np.ndarray]:
    """Short, typical, and longer-than-30-s (trimmed) clips."""
    return [_speech_like(s, seed) for seed, s in enumerate((0.6, 7.0, 12.3, 31.5))]


def _reference(audio: np.ndarray, n_mels: int, padding: int = N_SAMPLES) -> np.ndarray:
    extractor = WhisperFeatureExtractor(feature_size=n_mels)
    features = extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np", max_length=padding)
    return features.input_features[0]


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_transformers(n_mels: int) -> None:
    expected = mel_filter_bank(
        num_frequency_bins=201,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    np.testing.assert_array_equal(mel_filters(n_mels), expected)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_numpy_and_jax_match_whisper_feature_extractor(
    speech_like_clips: list[np.ndarray], n_mels: int, audio_kernel_path: str
) -> None:
    expected = np.stack([_reference(clip, n_mels) for clip in speech_like_clips])
    assert expected.shape == (len(speech_like_clips), n_mels, N_FRAMES)

    host = np.stack([log_mel_numpy(clip, n_mels) for clip in speech_like_clips])
    assert host.dtype == np.float32 and host.shape == expected.shape
    assert _max_diff(host, expected) <= TOLERANCE

    device = log_mel_jax(np.stack([pad_or_trim(clip) for clip in speech_like_clips]), n_mels)
    assert device.dtype == np.float32 and device.shape == expected.shape
    assert _max_diff(device, expected) <= TOLERANCE
    assert _max_diff(device, host) <= TOLERANCE


@pytest.mark.parametrize("length", [0, 1, 300, 3217, N_SAMPLES - 201, N_SAMPLES - 50, N_SAMPLES, N_SAMPLES + 999])
def test_edge_lengths_match(length: int, audio_kernel_path: str) -> None:
    """Empty and tiny clips, and audio reaching the right reflect padding, where frames that
    would otherwise be skipped as all-zero carry mirrored audio."""
    audio = (0.1 * np.random.default_rng(length).standard_normal(length)).astype(np.float32)
    expected = _reference(audio, 80)
    assert _max_diff(log_mel_numpy(audio), expected) <= TOLERANCE
    assert _max_diff(log_mel_jax(pad_or_trim(audio)[None])[0], expected) <= TOLERANCE


@pytest.mark.parametrize("padding", [16_000, 160_080])
def test_other_padding_lengths_match(padding: int, audio_kernel_path: str) -> None:
    """Shorter windows, including one that is not a whole number of hops."""
    audio = _speech_like(10.0, 5)[: padding - 40]  # reaches the right reflect padding
    expected = _reference(audio, 80, padding)
    assert expected.shape == (80, padding // 160)
    assert _max_diff(log_mel_numpy(audio, padding=padding), expected) <= TOLERANCE
    assert _max_diff(log_mel_jax(pad_or_trim(audio, padding)[None])[0], expected) <= TOLERANCE


def test_batch_matches_single(speech_like_clips: list[np.ndarray], audio_kernel_path: str) -> None:
    singles = np.stack([log_mel_numpy(clip) for clip in speech_like_clips])
    np.testing.assert_allclose(log_mel_numpy_batch(speech_like_clips), singles, rtol=0, atol=1e-6)

    padded = np.stack([pad_or_trim(clip) for clip in speech_like_clips])
    batched = np.asarray(log_mel_jax(padded))
    for i in range(len(padded)):
        single = log_mel_jax(padded[i : i + 1])[0]
        np.testing.assert_allclose(single, batched[i], rtol=0, atol=1e-5)


def test_per_clip_floor(audio_kernel_path: str) -> None:
    """The max - 8 floor belongs to each clip: a loud neighbour must not change a quiet clip."""
    quiet, loud = _speech_like(2.0, 1) * 1e-3, _speech_like(2.0, 2)
    batch = log_mel_numpy_batch([quiet, loud])
    np.testing.assert_allclose(batch[0], log_mel_numpy(quiet), rtol=0, atol=1e-6)
    device = log_mel_jax(np.stack([pad_or_trim(quiet), pad_or_trim(loud)]))
    np.testing.assert_allclose(device[0], log_mel_numpy(quiet), rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_load_audio_downmixes_and_resamples(tmp_path, fmt: str) -> None:
    rate, seconds = 44100, 1.5
    t = np.arange(int(rate * seconds)) / rate
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    path = tmp_path / f"stereo.{fmt.lower()}"
    sf.write(path, np.stack([tone, 0.5 * tone], axis=1), rate, format=fmt)  # PCM_16

    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - seconds * SAMPLE_RATE) <= 1
    # Mono is the channel mean; skip the resampler's edge transients.
    t16 = np.arange(len(audio)) / SAMPLE_RATE
    expected = 0.75 * 0.5 * np.sin(2 * np.pi * 440 * t16)
    assert _max_diff(audio[800:-800], expected[800:-800]) < 2e-3

    np.testing.assert_array_equal(decode_audio_bytes(path.read_bytes()), audio)


def _assert_error(path, reason: str, code: str) -> None:
    with pytest.raises(AudioError) as info:
        load_audio(path)
    message = str(info.value)
    assert str(path) in message and reason in message and "\n" not in message
    assert info.value.reason == code  # the pipeline's skip reason


def test_load_audio_errors(tmp_path) -> None:
    _assert_error(tmp_path / "missing.wav", "no such file", "audio_missing")

    garbage = tmp_path / "garbage.flac"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    _assert_error(garbage, "cannot decode", "audio_undecodable")

    zero_bytes = tmp_path / "zero_bytes.wav"
    zero_bytes.write_bytes(b"")
    _assert_error(zero_bytes, "cannot decode", "audio_undecodable")

    no_frames = tmp_path / "no_frames.wav"
    sf.write(no_frames, np.zeros((0, 1), np.float32), SAMPLE_RATE)
    _assert_error(no_frames, "no audio samples", "audio_empty")

    nan = tmp_path / "nan.wav"
    sf.write(nan, np.array([0.0, np.nan, 0.1], np.float32), SAMPLE_RATE, subtype="FLOAT")
    _assert_error(nan, "non-finite", "audio_nonfinite")

    with pytest.raises(AudioError, match="^clip-7: cannot decode"):
        decode_audio_bytes(b"not audio" * 10, name="clip-7")
    wav = tmp_path / "ok.wav"
    sf.write(wav, np.zeros(160, np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError, match="declared 8000 Hz but the audio is 16000 Hz") as info:
        decode_audio_bytes(wav.read_bytes(), declared_rate=8000)
    assert info.value.reason == "sample_rate"
