"""The native host audio kernels (jaxasr.kernels.audio): resampling accuracy, log-mel against the
NumPy path, argument checks, and the switch that turns them off. Log-mel parity with transformers
on both paths is in tests/audio/test_features.py."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxasr.audio import features
from jaxasr.kernels import audio as audio_kernels

pytestmark = pytest.mark.skipif(not audio_kernels.available(), reason="native audio kernels not built here")
SR = 16000


def _tone(freq: float, n: int, rate: float = SR) -> np.ndarray:
    return np.sin(2 * np.pi * freq * np.arange(n) / rate).astype(np.float32)


def _level_db(x: np.ndarray) -> float:
    """Level of a sine relative to full scale (0 dB = amplitude 1)."""
    return float(20 * np.log10(np.sqrt(2 * np.mean(np.asarray(x, np.float64) ** 2))))


@pytest.mark.parametrize("factor", [0.9, 0.95, 1.1, 1.25])
def test_speed_resampling_matches_the_analytic_signal(factor):
    """Reinterpreting a 1 kHz tone at SR * factor and resampling to SR gives a factor kHz tone."""
    x = _tone(1000.0, 24000)
    y = audio_kernels.resample(x, SR * factor, SR)
    assert y.dtype == np.float32 and len(y) == int(len(x) / factor + 0.5)
    expected = _tone(1000.0 * factor, len(y))
    inner = slice(100, len(y) - 100)  # the ends see the zeros beyond the clip
    assert np.abs(y[inner] - expected[inner]).max() < 1e-4


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_resampling_passband_and_stopband(factor):
    lower_nyquist = SR / 2 * min(1.0, factor)  # in output Hz: the band both rates can carry
    for f_out in (500.0, 3000.0, 0.75 * lower_nyquist):
        y = audio_kernels.resample(_tone(f_out / factor, SR), SR * factor, SR)
        assert abs(_level_db(y[200:-200])) < 0.01, f_out
    if factor > 1:  # shrinking: a tone past the output's Nyquist must not alias back in
        y = audio_kernels.resample(_tone(7840.0, SR), SR * factor, SR)  # lands at 8624 Hz
        assert _level_db(y[200:-200]) < -80


def test_resampling_ratio_and_empty_input():
    phases = audio_kernels.resample_phases(10, 9)
    assert phases.shape == (10, audio_kernels.TAPS) and not phases.flags.writeable
    # each phase passes DC with unit gain (up to the window's ripple)
    np.testing.assert_allclose(phases.sum(axis=1), 1.0, atol=2e-3)
    assert audio_kernels.resample(np.zeros(0, np.float32), SR * 1.1, SR).shape == (0,)


@pytest.mark.parametrize("length", [0, 160, 48_017, features.N_SAMPLES])
def test_log_mel_matches_numpy_path(length):
    audio = (0.2 * np.random.default_rng(length).standard_normal(length)).astype(np.float32)
    n_active = features._active_frames(length, features.N_SAMPLES)
    native = np.full((80, features.N_FRAMES), np.nan, np.float32)
    audio_kernels.log_mel_into(audio, features.N_SAMPLES, features._mel_filters_t32(80), native, n_active)
    numpy = np.empty_like(native)
    features._log_mel_into_numpy(audio, features.N_SAMPLES, numpy, n_active)
    assert np.isfinite(native).all()  # every frame written, skipped ones included
    np.testing.assert_allclose(native, numpy, rtol=0, atol=1e-5)


def _gcc(cxx: str) -> bool:
    return "Free Software Foundation" in subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout


@pytest.mark.parametrize("variant", ["avx2", "sse2", "gcc_builtin_shuffle"])
def test_other_builds_match(variant):
    """Builds this host would not pick: for AVX2 (8 lanes) and SSE2 (4 lanes) whatever this CPU
    has, and with GCC's __builtin_shuffle (GCC < 12 has no __builtin_shufflevector). Same log-mel
    as the NumPy path, same resampling as this machine's own build."""
    from jaxasr.kernels.build import build_library, compiler

    cxx = compiler()
    if variant in ("avx2", "sse2") and os.uname().machine != "x86_64":
        pytest.skip("x86-64 instruction set levels")
    if variant == "gcc_builtin_shuffle" and not _gcc(cxx):
        pytest.skip(f"{cxx} is not GCC")
    args = {"avx2": ["-march=x86-64-v3"], "sse2": ["-march=x86-64"],
            "gcc_builtin_shuffle": ["-DJAXASR_HAS_SHUFFLEVECTOR=0"]}[variant]
    lib = audio_kernels.declare(ctypes.CDLL(str(build_library(audio_kernels.SOURCE, cxx, args=args))))
    rng = np.random.default_rng(7)
    for length, n_mels in ((1_000, 80), (48_017, 128), (features.N_SAMPLES, 80)):
        audio = (0.2 * rng.standard_normal(length)).astype(np.float32)
        n_active = features._active_frames(length, features.N_SAMPLES)
        out = np.full((n_mels, features.N_FRAMES), np.nan, np.float32)
        assert lib.jaxasr_log_mel(audio, length, features.N_SAMPLES, features._mel_filters_t32(n_mels), n_mels,
                                  out, features.N_FRAMES, n_active) == 0
        numpy = np.empty_like(out)
        features._log_mel_into_numpy(audio, features.N_SAMPLES, numpy, n_active)
        np.testing.assert_allclose(out, numpy, rtol=0, atol=3e-5)
    x = (0.2 * rng.standard_normal(20_000)).astype(np.float32)
    y = np.empty(18_182, np.float32)  # 20000 * 10 / 11, rounded half up
    assert lib.jaxasr_resample(x, len(x), 10, 11, audio_kernels.resample_phases(10, 11), audio_kernels.TAPS,
                               y, len(y)) == 0
    np.testing.assert_allclose(y, audio_kernels.resample(x, SR * 1.1, SR), rtol=0, atol=1e-5)


def test_log_mel_rejects_bad_arguments():
    out = np.empty((80, 10), np.float32)
    with pytest.raises(ValueError, match="padding 100"):
        audio_kernels.log_mel_into(np.zeros(50, np.float32), 100, features._mel_filters_t32(80), out, 1)
    with pytest.raises(ValueError, match="11 of 10"):
        audio_kernels.log_mel_into(np.zeros(50, np.float32), 1600, features._mel_filters_t32(80), out, 11)


def test_switched_off_by_environment():
    code = ("from jaxasr.kernels import audio; from jaxasr.audio.augment import speed_perturb; import numpy as np; "
            "assert not audio.available(); print(len(speed_perturb(np.ones(1600, np.float32), 1.1)))")
    env = {**os.environ, "JAXASR_AUDIO_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1455"  # soxr's length
