"""Signal measurements shared by the audio tests."""

from __future__ import annotations

import numpy as np
import pytest


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.asarray(x, np.float64) ** 2)))


def median_f0(x: np.ndarray, sr: int = 16000) -> float:
    """Rough pitch: median autocorrelation peak (60-400 Hz) over loud 40 ms frames."""
    n, hop = int(0.04 * sr), int(0.01 * sr)
    lo, hi = sr // 400, sr // 60
    frames = [x[i : i + n] for i in range(0, len(x) - n, hop)]
    loud = [f for f in frames if rms(f) > 0.5 * rms(x)]
    f0 = []
    for f in loud:
        ac = np.correlate(f, f, "full")[n - 1 :]
        f0.append(sr / (lo + np.argmax(ac[lo:hi])))
    return float(np.median(f0))


@pytest.fixture(params=["native", "fallback"])
def audio_kernel_path(request, monkeypatch) -> str:
    """Runs a test on the native audio kernels, then with them off (NumPy log-mel, soxr)."""
    from jaxasr.kernels import audio as audio_kernels

    if request.param == "native" and not audio_kernels.available():
        pytest.skip("the native audio kernels could not be built here")
    if request.param == "fallback":
        monkeypatch.setattr(audio_kernels, "available", lambda: False)
    return request.param
