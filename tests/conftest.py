"""Shared fixtures: real synthesized English speech with known transcripts.

The clips come from jaxasr.audio.tts (libespeak-ng), so they need no network
and no downloaded data, and they are the same on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

SAMPLE_RATE = 16000

# Written for this project. No digits or abbreviations, so that the reference
# transcript is unambiguous for word error rate. (text, voice, rate, pitch)
CLIP_SPECS: list[tuple[str, str, int, int]] = [
    ("The weather is lovely today, so we are going for a walk.", "en-us", 165, 50),
    ("Could you please close the window before you leave?", "en-gb", 150, 45),
    ("I usually drink a cup of coffee with my breakfast.", "en-us+f3", 170, 60),
    ("The train to the city was late again because of the rain.", "en-us+m3", 160, 40),
    ("My sister practices the piano every evening after dinner.", "en-gb+f2", 155, 55),
    ("Take the amoxicillin twice daily with food.", "en-us", 140, 50),
    ("The patient reported chest pain and shortness of breath.", "en-gb", 160, 50),
    ("Your blood pressure is a little high, so we will check it next week.", "en-us+f3", 180, 55),
    ("Please stop taking ibuprofen before the surgery.", "en-us+m3", 150, 45),
    ("I would like to transfer money from my savings account.", "en-us", 175, 50),
    ("Your credit card payment is due at the end of the month.", "en-gb+f2", 165, 60),
    ("The bank approved our mortgage application this morning.", "en-gb", 170, 40),
]

# One speaker reading a short passage, joined with pauses into a clip longer
# than the 30 second window of Whisper-style models.
LONG_SENTENCES: list[str] = [
    "Good morning, and thank you for calling the clinic.",
    "The doctor has reviewed the results of your blood test.",
    "Your cholesterol is a little higher than we would like.",
    "We recommend more exercise and fewer fried foods.",
    "Please continue taking your medication every evening.",
    "If you feel dizzy or short of breath, call us right away.",
    "Your next appointment is on Thursday afternoon.",
    "Please bring your insurance card and a list of your medicines.",
    "The pharmacy will send a reminder when your prescription is ready.",
    "You can also pay your bill online with a debit card.",
    "We will not ask for your password over the phone.",
    "Thank you, and have a pleasant day.",
]
LONG_PAUSE_S = 0.5
# Silence around each short clip, as in a real recording; espeak starts speaking
# at the first sample, and recognizers tend to drop a word that starts that early.
EDGE_PAD_S = 0.25


@dataclass(frozen=True, eq=False)  # eq=False: identity hash, arrays inside
class SpeechClip:
    """A 16 kHz mono clip; ``audio`` is exactly what ``path`` holds."""

    path: Path
    audio: np.ndarray  # float32, 16 kHz
    text: str  # reference transcript
    voice: str = "en-us"
    rate: int = 165
    pitch: int = 50

    @property
    def duration(self) -> float:
        return len(self.audio) / SAMPLE_RATE

    def __getitem__(self, key: str):
        """So that ``clip["text"]`` works as well as ``clip.text``."""
        return getattr(self, key)


def _write(path: Path, audio: np.ndarray) -> np.ndarray:
    """Save as 16-bit PCM WAV and return the samples as read back, so that tests
    using ``audio`` and tests reading ``path`` see identical data."""
    sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
    return sf.read(path, dtype="float32")[0]


@pytest.fixture(scope="session")
def speech_clips(tmp_path_factory: pytest.TempPathFactory) -> list[SpeechClip]:
    """Short (2-6 s) English clips with transcripts, synthesized once per session.

    Mixed voices, rates and pitches; everyday, medical and banking sentences.
    """
    from jaxasr.audio.tts import synthesize

    out = tmp_path_factory.mktemp("speech_clips")
    pad = np.zeros(int(EDGE_PAD_S * SAMPLE_RATE), np.float32)
    clips = []
    for i, (text, voice, rate, pitch) in enumerate(CLIP_SPECS):
        speech = synthesize(text, voice=voice, rate=rate, pitch=pitch, sample_rate=SAMPLE_RATE)
        audio = np.concatenate([pad, speech, pad])
        path = out / f"clip_{i:02d}.wav"
        clips.append(SpeechClip(path, _write(path, audio), text, voice, rate, pitch))
    return clips


@pytest.fixture(scope="session")
def long_speech_clip(tmp_path_factory: pytest.TempPathFactory) -> SpeechClip:
    """About 40 s of one voice reading LONG_SENTENCES with short pauses."""
    from jaxasr.audio.tts import synthesize

    pause = np.zeros(int(LONG_PAUSE_S * SAMPLE_RATE), np.float32)
    pad = np.zeros(int(EDGE_PAD_S * SAMPLE_RATE), np.float32)
    parts = []
    for sentence in LONG_SENTENCES:
        parts += [synthesize(sentence, sample_rate=SAMPLE_RATE), pause]
    parts[-1] = pad  # edge padding instead of a pause after the last sentence
    path = tmp_path_factory.mktemp("long_speech") / "long.wav"
    audio = _write(path, np.concatenate([pad, *parts]))
    return SpeechClip(path, audio, " ".join(LONG_SENTENCES))


# --------------------------------------------------------------------------- real tiny.en
# Loaded once per session and shared, so that every test using the bundled model pays the
# CTranslate2 read once (and jitted searches, keyed on the model's structure, compile once).


@pytest.fixture(scope="session")
def tiny_en_checkpoint():
    """The bundled Whisper tiny.en as a `jaxasr.convert.sources.WhisperCheckpoint` (read-only: share it)."""
    from jaxasr.convert.sources import load_checkpoint

    return load_checkpoint("bundled:tiny.en")


@pytest.fixture(scope="session")
def tiny_en_hf_dir(tiny_en_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_en_checkpoint` exported as a float32 Hugging Face directory (transformers loads it)."""
    from jaxasr.convert.export import export_hf

    return export_hf(tiny_en_checkpoint, tmp_path_factory.mktemp("tiny_en_hf"))


# --------------------------------------------------------------------------- training runs
# A small random Whisper with tiny.en's vocabulary and the clips above in ArrayRecord shards:
# a whole training run (trainer, multi-host, LoRA experts tests) takes seconds.
SMALL_WHISPER = dict(d_model=64, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, max_target_positions=96)


@pytest.fixture(scope="session")
def small_whisper_dir(tiny_en_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialized 2-layer Whisper that uses tiny.en's tokenizer and generation config."""
    import dataclasses

    from flax import nnx

    from jaxasr.convert.export import save_native
    from jaxasr.convert.sources import WhisperCheckpoint
    from jaxasr.models.state import flat_state
    from jaxasr.models.whisper import Whisper

    base = tiny_en_checkpoint
    cfg = dataclasses.replace(base.config(), **SMALL_WHISPER)
    params = {k: np.asarray(v) for k, v in flat_state(Whisper(cfg, rngs=nnx.Rngs(0))).items()}
    ckpt = WhisperCheckpoint(hf_config={**base.hf_config, **cfg.hf_fields()},
                             generation_config=base.generation_config, params=params, tokenizer=base.tokenizer,
                             preprocessor_config=base.preprocessor_config, source="small-random")
    return save_native(ckpt, tmp_path_factory.mktemp("small_whisper"))


@pytest.fixture(scope="session")
def speech_records(speech_clips, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 12 synthesized clips as one ArrayRecord shard (FLAC)."""
    from jaxasr.data.records import write_shards

    out = tmp_path_factory.mktemp("speech_records")
    write_shards(({"id": c.path.stem, "audio_bytes": c.path.read_bytes(), "text": c.text} for c in speech_clips),
                 out, num_shards=1)
    return out


@pytest.fixture(params=["openblas", "mkl"])
def each_blas(request):
    """Runs a native-kernel test on each BLAS the kernels' sgemm can use (jaxasr.kernels.cpu),
    restoring the default afterwards. MKL comes from the `mkl` extra (`make setup` installs it).
    Parametrized indirectly with None: no native kernel in that case, nothing switched."""
    from jaxasr.kernels import cpu

    if request.param is None:
        yield None
        return
    assert cpu.available(), "the native CPU kernels did not build here (see the logged warning)"
    if request.param == "mkl" and cpu.mkl_library() is None:
        pytest.skip("the mkl wheel is not installed (pip install -e '.[mkl]')")
    previous = cpu.use_blas(request.param)
    yield request.param
    cpu.use_blas(previous)
