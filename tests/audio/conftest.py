"""Signal measurements shared by the audio tests."""

from __future__ import annotations

import numpy as np


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
