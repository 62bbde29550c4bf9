"""Small text-to-speech front end for tests, benchmarks and demos.

The main backend is libespeak-ng, loaded with ctypes from the ``espeakng-loader``
wheel, so it works on a fresh machine with no system packages.  The ``flite`` and
``espeak-ng`` programs are used only when they are on PATH: flite for its voices,
the espeak-ng program as a fallback if the library can't be loaded.

Voice specs are ``"backend:name"``, e.g. ``"espeak:en-us+f3"`` or ``"flite:slt"``;
a plain name such as ``"en-gb"`` means espeak.  espeak output is deterministic:
the same text, voice, rate and pitch give the same samples in any process.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

__all__ = ["RATE_RANGE", "available_voices", "synthesize"]

RATE_RANGE = (80, 450)  # words per minute accepted by espeak

# Values from espeak-ng 1.52 speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2  # espeak_AUDIO_OUTPUT: the callback runs inside espeak_Synth
_POS_CHARACTER = 1  # espeak_POSITION_TYPE
_CHARS_UTF8 = 1  # espeak_Synth flags
_ESPEAK_RATE = 1  # espeak_PARAMETER
_ESPEAK_PITCH = 3
_EE_OK = 0  # espeak_ERROR


class _EspeakVoice(ctypes.Structure):
    """espeak_VOICE from speak_lib.h."""

    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_char_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


# int SynthCallback(short *wav, int numsamples, espeak_EVENT *events); the events
# are not needed, so they stay an opaque pointer.
_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)

# English voices listed by available_voices(); "+name" adds an espeak voice variant.
_ESPEAK_VOICES = ("en-us", "en-gb", "en-us+f3", "en-us+m3", "en-gb+f2", "en-us+klatt")

_LOCK = threading.Lock()  # guards everything below: espeak is one global state
_chunks: list[np.ndarray] = []
_lib_copy: Path | None = None


@_SynthCallback
def _collect(wav, n: int, _events) -> int:
    if wav and n > 0:
        _chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
    return 0  # 0 = continue synthesis


def _private_lib_path() -> Path:
    """A private copy of libespeak-ng, made once per process.

    The library keeps state that survives espeak_Terminate and makes each
    utterance depend on the ones before it (pitch-flutter phase, a cycle counter
    for voice roughness, the gain control). To be deterministic we load it fresh
    for every utterance and unload it afterwards. A private copy makes sure the
    unload really happens even if other code in this process loaded the same
    library, and that we never reset espeak state underneath it.
    """
    global _lib_copy
    if _lib_copy is None:
        import espeakng_loader

        tmp = Path(tempfile.mkdtemp(prefix="jaxasr-espeak-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        src = Path(espeakng_loader.get_library_path())
        _lib_copy = Path(shutil.copy2(src, tmp / src.name))
    return _lib_copy


def _load_espeak() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(_private_lib_path()))
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetVoiceByProperties.argtypes = [ctypes.POINTER(_EspeakVoice)]
    lib.espeak_SetVoiceByProperties.restype = ctypes.c_int
    lib.espeak_GetCurrentVoice.argtypes = []
    lib.espeak_GetCurrentVoice.restype = ctypes.POINTER(_EspeakVoice)
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_SetParameter.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
        ctypes.c_uint, ctypes.c_uint, ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p,
    ]  # fmt: skip
    lib.espeak_Synth.restype = ctypes.c_int
    lib.espeak_Synchronize.restype = ctypes.c_int
    lib.espeak_Terminate.restype = ctypes.c_int
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_ng_SetRandSeed.restype = ctypes.c_int
    return lib


def _unload(lib: ctypes.CDLL) -> None:
    """Unload the library so that its static state is gone; don't use ``lib`` after."""
    import _ctypes  # dlclose/FreeLibrary live here; ctypes has no public unload

    if sys.platform == "win32":
        _ctypes.FreeLibrary(lib._handle)
    else:
        _ctypes.dlclose(lib._handle)


def _set_voice(lib: ctypes.CDLL, voice: str, data_path: str) -> None:
    base, _, variant = voice.partition("+")
    # espeak ignores unknown variants silently; fail loudly instead.
    if variant and not (Path(data_path) / "voices" / "!v" / variant).is_file():
        raise ValueError(f"unknown espeak voice variant {variant!r} in {voice!r}")
    if lib.espeak_SetVoiceByName(voice.encode()) == _EE_OK:
        return
    # Like the espeak-ng CLI, fall back to treating the name as a language:
    # "en-gb" is a language whose voice file is called "gmw/en".
    if lib.espeak_SetVoiceByProperties(_EspeakVoice(languages=base.encode())) != _EE_OK:
        raise ValueError(f"unknown espeak voice {voice!r}")
    if variant:  # selecting by language drops the variant; re-add it by file name
        ident = lib.espeak_GetCurrentVoice().contents.identifier.decode()
        if lib.espeak_SetVoiceByName(f"{ident}+{variant}".encode()) != _EE_OK:
            raise ValueError(f"unknown espeak voice {voice!r}")


def _espeak_lib_synth(text: str, voice: str, rate: int, pitch: int) -> tuple[np.ndarray, int]:
    import espeakng_loader

    data_path = espeakng_loader.get_data_path()
    with _LOCK:
        lib = _load_espeak()
        try:
            # path may name the espeak-ng-data directory itself; buflength 0 = default.
            sr = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), 0)
            if sr <= 0:
                raise RuntimeError(f"espeak_Initialize failed ({sr})")
            lib.espeak_SetSynthCallback(_collect)
            _set_voice(lib, voice, data_path)
            lib.espeak_SetParameter(_ESPEAK_RATE, rate, 0)
            lib.espeak_SetParameter(_ESPEAK_PITCH, pitch, 0)
            lib.espeak_ng_SetRandSeed(0)  # Initialize seeds it from the clock
            buf = ctypes.create_string_buffer(text.encode("utf-8"))  # NUL-terminated
            _chunks.clear()
            err = lib.espeak_Synth(buf, len(buf), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            lib.espeak_Synchronize()
            if err != _EE_OK:
                raise RuntimeError(f"espeak_Synth failed ({err})")
            samples = np.concatenate(_chunks) if _chunks else np.zeros(0, np.int16)
        finally:
            _chunks.clear()
            lib.espeak_Terminate()
            _unload(lib)
    return samples.astype(np.float32) / 32768.0, sr


_OUT = "<out.wav>"  # placeholder for the output path in _run_to_wav commands


def _run_to_wav(cmd: list[str]) -> tuple[np.ndarray, int]:
    """Run a TTS program that writes a WAV file where ``cmd`` says ``_OUT``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.wav"
        cmd = [str(out) if a == _OUT else a for a in cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.strip()}")
        audio, sr = sf.read(out, dtype="float32", always_2d=True)
    return audio.mean(axis=1), sr


def _espeak_synth(text: str, name: str, rate: int, pitch: int) -> tuple[np.ndarray, int]:
    try:
        return _espeak_lib_synth(text, name, rate, pitch)
    except (ImportError, OSError) as e:  # no wheel or unloadable library
        if shutil.which("espeak-ng") is None:
            raise RuntimeError(f"libespeak-ng could not be loaded: {e}") from e
    # "--" so that text starting with "-" is not read as an option.
    return _run_to_wav(
        ["espeak-ng", "-v", name, "-s", str(rate), "-p", str(pitch), "-w", _OUT, "--", text]
    )


@functools.cache
def _flite_voices() -> tuple[str, ...]:
    """Voices built into the flite program on PATH (none if it isn't installed)."""
    if shutil.which("flite") is None:
        return ()
    out = subprocess.run(["flite", "-lv"], capture_output=True, text=True).stdout
    _, _, names = out.partition("Voices available:")
    return tuple(names.split())


def _flite_synth(text: str, name: str, rate: int, pitch: int) -> tuple[np.ndarray, int]:
    if shutil.which("flite") is None:
        raise RuntimeError("flite voices need the flite program on PATH")
    # flite quietly falls back to its default voice for unknown names.
    if name not in _flite_voices() and not Path(name).is_file():  # or a .flitevox file
        raise ValueError(f"unknown flite voice {name!r}; flite has {list(_flite_voices())}")
    if pitch != 50:
        raise ValueError("the flite backend does not support pitch; use pitch=50")
    # flite has no words-per-minute setting; stretch durations relative to
    # 165 wpm, roughly its default speed.
    stretch = f"duration_stretch={165 / rate:.4f}"
    return _run_to_wav(["flite", "-voice", name, "--setf", stretch, "-t", text, "-o", _OUT])


def synthesize(
    text: str,
    voice: str = "en-us",
    rate: int = 165,
    pitch: int = 50,
    sample_rate: int = 16000,
) -> np.ndarray:
    """Speak ``text``; return float32 mono audio in [-1, 1] at ``sample_rate``.

    ``voice`` is a spec from :func:`available_voices` or a plain espeak voice name
    (``"en-us"``, ``"en-gb+f2"``). ``rate`` is in words per minute (80-450);
    ``pitch`` is 0-100, 50 being the voice's normal pitch. Thread-safe.
    """
    if not text or not text.strip():
        raise ValueError("text is empty")
    if not RATE_RANGE[0] <= rate <= RATE_RANGE[1]:
        raise ValueError(f"rate must be in {RATE_RANGE} words per minute, got {rate}")
    if not 0 <= pitch <= 100:
        raise ValueError(f"pitch must be in [0, 100], got {pitch}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")

    backend, sep, name = voice.partition(":")
    if not sep:
        backend, name = "espeak", voice
    if backend not in ("espeak", "flite") or not name:
        raise ValueError(f"bad voice {voice!r}; e.g. 'en-gb', 'espeak:en-us+f3', 'flite:slt'")

    synth = _flite_synth if backend == "flite" else _espeak_synth
    audio, sr = synth(text, name, rate, pitch)
    if sr != sample_rate:
        audio = soxr.resample(audio, sr, sample_rate, quality="HQ")
    # Resampling can overshoot full scale slightly; keep the [-1, 1] promise.
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def available_voices() -> list[str]:
    """Voice specs usable on this machine: espeak English voices, flite's if installed."""
    voices = []
    try:
        import espeakng_loader

        have_espeak = os.path.exists(espeakng_loader.get_library_path())
    except ImportError:
        have_espeak = False
    if have_espeak or shutil.which("espeak-ng"):
        voices += [f"espeak:{v}" for v in _ESPEAK_VOICES]
    # flite's "*_time" voices can only say clock times.
    voices += [f"flite:{v}" for v in _flite_voices() if not v.endswith("_time")]
    return voices
