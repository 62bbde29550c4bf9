"""Tests for jaxasr.audio.augment on real synthesized speech."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal
import scipy.stats

from jaxasr.audio.augment import (
    add_noise,
    apply_gain,
    coloured_noise,
    concat_utterances,
    draw_target_seconds,
    random_crop,
    spec_augment,
    speed_perturb,
)

from tests.audio.conftest import median_f0, rms

SR = 16000
SENTENCE = "Take the amoxicillin twice daily with food."


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    from jaxasr.audio.tts import synthesize

    audio = synthesize(SENTENCE, voice="en-us")
    audio.setflags(write=False)  # any in-place change by the code under test raises
    return audio


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- speed


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_speed_perturb_changes_length_and_pitch(speech, factor, audio_kernel_path):
    out = speed_perturb(speech, factor)
    assert out.dtype == np.float32
    assert abs(len(out) - len(speech) / factor) <= 0.01 * len(speech) / factor
    ratio = median_f0(out) / median_f0(speech)
    assert ratio == pytest.approx(factor, abs=0.04)


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_speed_perturb_native_agrees_with_soxr(speech, factor, monkeypatch):
    """The two resamplers differ only near the band edge (the native filter rolls off from
    ~6 kHz, soxr's from ~7.6): on speech, 1-2% of the signal's RMS."""
    from jaxasr.kernels import audio as audio_kernels

    if not audio_kernels.available():
        pytest.skip("the native audio kernels could not be built here")
    native = speed_perturb(speech, factor)
    monkeypatch.setattr(audio_kernels, "available", lambda: False)
    reference = speed_perturb(speech, factor)
    assert native.shape == reference.shape
    assert rms(native - reference) < 0.03 * rms(reference)


def test_speed_perturb_identity_and_bad_factor(speech):
    out = speed_perturb(speech, 1.0)
    np.testing.assert_array_equal(out, speech)
    assert out is not speech
    with pytest.raises(ValueError):
        speed_perturb(speech, 0.0)


# --------------------------------------------------------------------------- coloured noise


@pytest.mark.parametrize("exponent", [0.0, 1.0, 2.0])
def test_coloured_noise_slope_and_level(exponent):
    x = coloured_noise(1 << 16, exponent, _rng(1))
    assert x.dtype == np.float32 and x.shape == (1 << 16,)
    assert abs(float(np.mean(x, dtype=np.float64))) < 1e-6
    assert rms(x) == pytest.approx(1.0, abs=1e-5)
    f, p = scipy.signal.welch(x.astype(np.float64), nperseg=4096)
    band = (f > 0.002) & (f < 0.25)
    slope = np.polyfit(np.log10(f[band]), np.log10(p[band]), 1)[0]
    assert slope == pytest.approx(-exponent, abs=0.3)
    if exponent < 2:  # a brown sample this short is a few slow swings: its kurtosis varies a lot
        assert scipy.stats.kurtosis(x, fisher=False) == pytest.approx(3.0, abs=0.15)  # Gaussian: 3


def test_coloured_noise_seeded():
    a, b, c = (coloured_noise(1000, 1.0, _rng(seed)) for seed in (3, 3, 4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# --------------------------------------------------------------------------- add_noise


def _snr_db(clean: np.ndarray, mixed: np.ndarray) -> float:
    clean = clean.astype(np.float64)
    residual = mixed.astype(np.float64) - clean
    return 10 * np.log10(np.mean(clean**2) / np.mean(residual**2))


@pytest.mark.parametrize("snr_db", [0.0, 10.0, 25.0])
@pytest.mark.parametrize("exponent", [0.0, 1.0])
def test_add_noise_hits_target_snr(speech, snr_db, exponent):
    clean = (0.3 * speech / np.max(np.abs(speech))).astype(np.float32)
    noise = coloured_noise(3 * len(clean), exponent, _rng(5))
    out = add_noise(clean, noise, snr_db, _rng(6))
    assert out.dtype == np.float32 and out.shape == clean.shape
    assert np.max(np.abs(out)) <= 1.0  # no peak rescaling, so the residual is the noise
    assert _snr_db(clean, out) == pytest.approx(snr_db, abs=0.1)


def test_add_noise_tiles_short_noise(speech):
    clean = (0.3 * speech).astype(np.float32)
    noise = coloured_noise(1000, 0.0, _rng(7))
    out = add_noise(clean, noise, 10.0, _rng(8))
    residual = out.astype(np.float64) - clean
    np.testing.assert_allclose(residual[1000:], residual[:-1000], atol=1e-5)
    assert _snr_db(clean, out) == pytest.approx(10.0, abs=0.1)
    # The tiling starts at a random phase of the noise.
    phases = set()
    for seed in range(8, 12):
        residual = add_noise(clean, noise, 10.0, _rng(seed)).astype(np.float64) - clean
        rolled = [np.corrcoef(np.roll(noise, -k), residual[:1000])[0, 1] for k in range(1000)]
        assert max(rolled) > 0.9999
        phases.add(int(np.argmax(rolled)))
    assert len(phases) > 1


def test_add_noise_uses_random_window_of_long_noise(speech):
    clean = (0.3 * speech).astype(np.float32)
    noise = coloured_noise(len(clean) + 20000, 0.0, _rng(9))
    offsets = []
    for seed in (10, 11):
        residual = add_noise(clean, noise, 5.0, _rng(seed)).astype(np.float64) - clean
        corr = scipy.signal.correlate(noise, residual, mode="valid", method="fft")
        k = int(np.argmax(corr))
        window = noise[k : k + len(clean)]
        assert np.corrcoef(window, residual)[0, 1] > 0.9999
        offsets.append(k)
    assert offsets[0] != offsets[1]


def test_add_noise_rescales_loud_mixture(speech):
    noise = coloured_noise(len(speech), 0.0, _rng(12))
    quiet = add_noise((0.01 * speech).astype(np.float32), noise, 0.0, _rng(13))
    loud = add_noise((3.0 * speech).astype(np.float32), noise, 0.0, _rng(13))
    assert np.max(np.abs(loud)) == pytest.approx(0.99, abs=1e-6)
    # The mixing is linear in the input level, so the loud mixture is the quiet one rescaled.
    np.testing.assert_allclose(loud, quiet * (0.99 / np.max(np.abs(quiet))), atol=1e-5)


def test_add_noise_silent_input_unchanged():
    silent = np.zeros(16000, np.float32)
    out = add_noise(silent, coloured_noise(500, 0.0, _rng(0)), 10.0, _rng(1))
    np.testing.assert_array_equal(out, silent)
    assert out is not silent
    tone = (0.1 * np.sin(np.arange(16000) * 0.05)).astype(np.float32)
    np.testing.assert_array_equal(add_noise(tone, np.zeros(100), 10.0, _rng(1)), tone)


# --------------------------------------------------------------------------- gain


@pytest.mark.parametrize("gain_db", [-12.0, -3.0, 6.0])
def test_apply_gain_exact_db(speech, gain_db):
    quiet = (0.2 * speech / np.max(np.abs(speech))).astype(np.float32)
    out = apply_gain(quiet, gain_db)
    assert out.dtype == np.float32
    assert 20 * np.log10(rms(out) / rms(quiet)) == pytest.approx(gain_db, abs=1e-4)


def test_apply_gain_clips(speech):
    out = apply_gain(speech, 40.0)
    assert np.max(out) == 1.0 and np.min(out) == -1.0
    assert np.mean(np.abs(out) == 1.0) > 0.05


# --------------------------------------------------------------------------- spec_augment


def _log_mel(n_mels: int, frames: int, valid: int, seed: int = 0) -> np.ndarray:
    """Distinct random values over the valid frames, then a constant floor (as Whisper pads)."""
    spec = np.full((n_mels, frames), -0.5, np.float32)
    spec[:, :valid] = _rng(seed).uniform(-1.0, 1.5, (n_mels, valid))
    spec.setflags(write=False)
    return spec


def _masks(spec: np.ndarray, out: np.ndarray, valid: int, fill: float):
    """(fully masked columns, fully masked rows) within the valid region."""
    masked = (out == np.float32(fill)) & (spec != np.float32(fill))
    cols = np.flatnonzero(masked[:, :valid].all(axis=0))
    rows = np.flatnonzero(masked[:, :valid].all(axis=1))
    return cols, rows


def _runs(idx: np.ndarray) -> list[int]:
    """Lengths of runs of consecutive indices."""
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1)
    edges = np.concatenate([[-1], breaks, [idx.size - 1]])
    return list(np.diff(edges))


@pytest.mark.parametrize("n_mels", [80, 128])
def test_spec_augment_masks_inside_valid_frames(n_mels):
    valid = 1200
    spec = _log_mel(n_mels, 3000, valid)
    fill = spec[:, :valid].mean()
    seen_time = seen_freq = False
    for seed in range(10):
        out = spec_augment(spec, _rng(seed), valid_frames=valid)
        assert out.shape == spec.shape and out.dtype == np.float32
        np.testing.assert_array_equal(out[:, valid:], spec[:, valid:])  # padding untouched
        changed = out != spec
        assert np.all(out[changed] == np.float32(fill))  # default value: mean of the valid region
        cols, rows = _masks(spec, out, valid, fill)
        # Every changed cell is in a time-masked column or a frequency-masked row.
        covered = np.zeros_like(changed)
        covered[:, cols] = True
        covered[rows, :valid] = True
        assert not np.any(changed & ~covered)
        assert len(rows) <= 2 * 27
        seen_time |= cols.size > 0
        seen_freq |= rows.size > 0
    assert seen_time and seen_freq


def test_spec_augment_widths_bounded():
    spec = _log_mel(80, 3000, 3000)
    fill = spec.mean()
    time_widths, freq_widths = [], []
    for seed in range(60):
        out = spec_augment(spec, _rng(seed), num_freq_masks=1, num_time_masks=1)
        cols, rows = _masks(spec, out, 3000, fill)
        time_widths.append(cols.size)
        freq_widths.append(rows.size)
        assert len(_runs(cols)) <= 1 and len(_runs(rows)) <= 1
    # One time mask over 3000 frames: a count of 1 (ceil(1 * 3000 / 3000)), width up to 100.
    assert max(time_widths) <= 100 and max(time_widths) >= 80
    assert max(freq_widths) <= 27 and max(freq_widths) >= 20


def test_spec_augment_adapts_to_short_clips():
    short_valid = 200  # 2 s: one time mask of at most 5% = 10 frames
    short = _log_mel(80, 3000, short_valid)
    full = _log_mel(80, 3000, 3000)
    short_fracs, full_runs = [], []
    for seed in range(40):
        out = spec_augment(short, _rng(seed), valid_frames=short_valid, num_freq_masks=0)
        cols, _ = _masks(short, out, short_valid, short[:, :short_valid].mean())
        assert len(_runs(cols)) <= 1 and cols.size <= 10
        short_fracs.append(cols.size / short_valid)
        out = spec_augment(full, _rng(seed), num_freq_masks=0)
        cols, _ = _masks(full, out, 3000, full.mean())
        assert cols.size <= 10 * 100
        full_runs.append(len(_runs(cols)))
    assert max(short_fracs) <= 0.05
    assert max(full_runs) >= 7  # up to 10 masks on a full 30 s clip


def test_spec_augment_seeded_and_mask_value():
    spec = _log_mel(80, 3000, 2500)
    a = spec_augment(spec, _rng(42), valid_frames=2500)
    np.testing.assert_array_equal(a, spec_augment(spec, _rng(42), valid_frames=2500))
    assert not np.array_equal(a, spec_augment(spec, _rng(43), valid_frames=2500))
    out = spec_augment(spec, _rng(42), valid_frames=2500, mask_value=-7.0)
    changed = out != spec
    assert changed.any() and np.all(out[changed] == -7.0)
    # Same draws, different fill: the same cells are masked.
    np.testing.assert_array_equal(changed, a != spec)


def test_spec_augment_no_valid_frames_is_identity():
    spec = _log_mel(80, 300, 0)
    out = spec_augment(spec, _rng(0), valid_frames=0)
    np.testing.assert_array_equal(out, spec)
    with pytest.raises(ValueError):
        spec_augment(spec, _rng(0), valid_frames=301)


# --------------------------------------------------------------------------- multi-scale helpers


def test_draw_target_seconds_distribution():
    rng = _rng(0)
    draws = np.array([draw_target_seconds(rng) for _ in range(4000)])
    assert np.all((draws > 1.0) & (draws <= 30.0))
    assert draws.min() >= 4.0 - 1e-9
    for scale in (5.0, 10.0, 20.0):  # each scale's ±20% band is populated
        assert np.sum(np.abs(draws / scale - 1) <= 0.2) > 500
    clamped = np.mean(draws == 30.0)
    assert 0.08 < clamped < 0.18  # half of the 30 s draws (1/8 of all) clamp to 30
    same = [draw_target_seconds(_rng(5)) for _ in range(3)]
    assert same[0] == same[1] == same[2]
    assert draw_target_seconds(_rng(0), scales=(7.0,), jitter=0.0) == 7.0
    assert draw_target_seconds(_rng(0), scales=(0.5,), jitter=0.0) == 1.0


def test_random_crop(speech):
    np.testing.assert_array_equal(random_crop(speech, len(speech) + 5, _rng(0)), speech)
    ramp = np.arange(50000, dtype=np.float32)
    starts = set()
    for seed in range(5):
        out = random_crop(ramp, 16000, _rng(seed))
        assert out.shape == (16000,)
        np.testing.assert_array_equal(np.diff(out), 1.0)  # one contiguous window
        starts.add(int(out[0]))
    assert len(starts) > 1
    np.testing.assert_array_equal(
        random_crop(ramp, 16000, _rng(3)), random_crop(ramp, 16000, _rng(3))
    )


def test_concat_utterances(speech):
    a, b = speech[:8000], speech[8000:]
    texts = ["take the", " amoxicillin ", SENTENCE]
    audio, text = concat_utterances([a, b, speech], texts, gap_seconds=0.25)
    gap = 4000
    assert audio.dtype == np.float32
    assert len(audio) == len(speech) * 2 + 2 * gap
    np.testing.assert_array_equal(audio[:8000], a)
    np.testing.assert_array_equal(audio[8000 : 8000 + gap], 0.0)
    np.testing.assert_array_equal(audio[8000 + gap : 8000 + gap + len(b)], b)
    np.testing.assert_array_equal(audio[-len(speech) :], speech)
    assert text == f"take the amoxicillin {SENTENCE}"
    with pytest.raises(ValueError):
        concat_utterances([a], ["x", "y"])


def test_spec_augment_in_place():
    spec = _log_mel(80, 3000, 2500).copy()
    copy = spec_augment(spec, _rng(5), valid_frames=2500)
    assert not np.array_equal(copy, spec)  # the input was left alone...
    same = spec_augment(spec, _rng(5), valid_frames=2500, in_place=True)
    assert same is spec and np.array_equal(spec, copy)  # ...unless asked to mask it
    with pytest.raises(ValueError, match="writable float32 array, got a read-only"):
        spec_augment(_log_mel(80, 3000, 2500), _rng(5), in_place=True)
    with pytest.raises(ValueError, match="got a float64"):
        spec_augment(spec.astype(np.float64), _rng(5), in_place=True)
