"""`python -m jaxasr.transcribe`, run in-process on real speech with the bundled tiny.en.

`load_checkpoint` is swapped for the session's already loaded tiny.en (the test checks it is
asked for the `--model` given). Every run that transcribes has three or four readable files, so
the search runs at the padded batch of four that tests/decoding compiles too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from jaxasr import transcribe
from jaxasr.audio.io import load_audio
from jaxasr.scoring import error_rates, normalizer

NORM = normalizer("en")


@pytest.fixture
def cli(monkeypatch, tiny_en_checkpoint, capsys):
    """run(argv) -> (exit code, stdout lines, stderr lines); records the model sources asked for."""
    asked: list[str] = []

    def fake_load_checkpoint(source):
        asked.append(str(source))
        return tiny_en_checkpoint

    monkeypatch.setattr(transcribe, "load_checkpoint", fake_load_checkpoint)

    def run(argv):
        capsys.readouterr()  # drop anything earlier
        code = transcribe.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out.splitlines(), err.splitlines()

    run.asked = asked
    return run


@pytest.fixture
def flac_44k_stereo(speech_clips, tmp_path) -> tuple[Path, str]:
    """Clip 9 resampled to 44.1 kHz, as a stereo FLAC (the channels at different gains)."""
    clip = speech_clips[9]
    audio = soxr.resample(clip.audio, 16000, 44100, quality="HQ")
    path = tmp_path / "stereo_44k.flac"
    sf.write(path, np.stack([audio, 0.6 * audio], axis=1), 44100, format="FLAC", subtype="PCM_16")
    return path, clip.text


def test_files_with_a_corrupt_and_a_missing_one(cli, speech_clips, flac_44k_stereo, tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    missing = tmp_path / "missing.wav"
    flac, flac_text = flac_44k_stereo
    good = [speech_clips[0].path, speech_clips[6].path, flac]
    refs = [speech_clips[0].text, speech_clips[6].text, flac_text]

    code, out, err = cli([good[0], corrupt, good[1], missing, good[2]])

    assert code == 1
    assert cli.asked == ["bundled:tiny.en"]  # the default --model
    # One `path<TAB>text` line per readable file, in the order given.
    assert len(out) == 3, out
    paths, texts = zip(*(line.split("\t") for line in out))
    assert list(paths) == [str(p) for p in good]
    assert all(texts)
    rates = error_rates(refs, list(texts), NORM)
    assert rates["wer"] < 25.0, (rates, texts)
    assert NORM(texts[1]) == NORM(refs[1])  # "The patient reported chest pain..." (tiny.en gets it right)
    assert NORM(texts[2]) == NORM(flac_text)  # the 44.1 kHz stereo FLAC was read, downmixed and resampled

    # One single-line error per unreadable file, naming it, and a summary.
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 2, err
    assert str(corrupt) in errors[0] and "cannot decode" in errors[0]
    assert str(missing) in errors[1] and "no such file" in errors[1]
    assert "2 of 5 files could not be read" in err


def test_only_unreadable_files(cli, tmp_path):
    code, out, err = cli([tmp_path / "nope.wav", tmp_path / "nope.flac"])
    assert code == 1
    assert out == []
    assert sum(line.startswith("error:") for line in err) == 2
    assert "2 of 2 files could not be read" in err


def test_44k_stereo_flac_is_decoded_to_16k_mono(flac_44k_stereo, speech_clips):
    path, _ = flac_44k_stereo
    audio = load_audio(path)
    original = speech_clips[9].audio
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - len(original)) <= 1
    n = min(len(audio), len(original))
    # Mean of the two channels is 0.8 x the clip, back at 16 kHz (16-bit FLAC, two resamplings).
    np.testing.assert_allclose(audio[:n], 0.8 * original[:n], atol=0.02)
    assert np.corrcoef(audio[:n], original[:n])[0, 1] > 0.999


def write_manifest(path: Path, entries) -> Path:
    path.write_text("".join((e if isinstance(e, str) else json.dumps(e)) + "\n" for e in entries), encoding="utf-8")
    return path


def test_manifest_with_references(cli, speech_clips, tmp_path):
    # Paths relative to the manifest's folder and absolute ones; extra fields are kept.
    (tmp_path / "audio").mkdir()
    rel = Path("audio") / "b.wav"
    (tmp_path / rel).write_bytes(speech_clips[2].path.read_bytes())
    entries = [
        {"audio": str(speech_clips[10].path), "text": speech_clips[10].text, "id": "u1"},
        {"audio": str(rel), "text": speech_clips[2].text, "id": "u2"},
        {"audio": str(speech_clips[11].path), "text": speech_clips[11].text, "id": "u3", "speaker": "gb"},
    ]
    manifest = write_manifest(tmp_path / "set.jsonl", [entries[0], "", entries[1], entries[2]])  # blank line ok
    output = tmp_path / "results" / "nested" / "out.jsonl"

    code, out, err = cli(["--manifest", manifest, "--output", output, "--model", "bundled:tiny.en"])

    assert code == 0, err
    results = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in results] == ["u1", "u2", "u3"]
    for entry, result in zip(entries, results):
        assert {k: v for k, v in result.items() if k != "hypothesis"} == entry  # no internal fields leak
        assert isinstance(result["hypothesis"], str) and result["hypothesis"]
    expected = error_rates([r["text"] for r in results], [r["hypothesis"] for r in results], NORM)

    score_lines = [line for line in out if line.startswith("WER")]
    assert len(score_lines) == 1, out
    match = re.fullmatch(r"WER (\d+\.\d\d)%  CER (\d+\.\d\d)%  over (\d+) utterances", score_lines[0])
    assert match, score_lines[0]
    assert float(match[1]) == pytest.approx(expected["wer"], abs=0.006)
    assert float(match[2]) == pytest.approx(expected["cer"], abs=0.006)
    assert int(match[3]) == 3
    assert expected["wer"] < 30.0


def test_manifest_without_references_and_a_missing_file(cli, speech_clips, tmp_path):
    entries = [{"audio": str(c.path)} for c in speech_clips[3:6]] + [{"audio": "gone.wav"}]
    manifest = write_manifest(tmp_path / "set.jsonl", entries)

    code, out, err = cli(["--manifest", manifest])

    assert code == 1
    assert len(out) == 3 and not any(line.startswith("WER") for line in out)
    assert [line.split("\t")[0] for line in out] == [e["audio"] for e in entries[:3]]
    assert all(line.split("\t")[1] for line in out)
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and str(tmp_path / "gone.wav") in errors[0]


@pytest.mark.parametrize(
    ("lines", "bad_line", "message"),
    [
        (['{"audio": "a.wav"}', '{"audio": "b.wav", ', '{"audio": "c.wav"}'], 2, "not valid JSON"),
        (['{"audio": "a.wav"}', "", '{"text": "no audio field"}'], 3, "expected an object with an 'audio' field"),
        (['["a.wav"]'], 1, "expected an object"),
    ],
)
def test_malformed_manifest_names_file_and_line(cli, tmp_path, lines, bad_line, message):
    manifest = write_manifest(tmp_path / "bad.jsonl", lines)
    code, out, err = cli(["--manifest", manifest])
    assert code == 2
    assert out == []
    assert len(err) == 1
    assert err[0].startswith(f"error: {manifest}:{bad_line}: ")
    assert message in err[0]
    assert cli.asked == []  # failed before loading any model


def test_missing_manifest(cli, tmp_path):
    code, _, err = cli(["--manifest", tmp_path / "absent.jsonl"])
    assert code == 2
    assert len(err) == 1 and str(tmp_path / "absent.jsonl") in err[0]


@pytest.mark.parametrize(
    "argv",
    [
        [],  # neither files nor a manifest
        ["a.wav", "--manifest", "m.jsonl"],  # both
        ["a.wav", "--output", "o.jsonl"],  # --output without --manifest
        ["a.wav", "--beam-size", "0"],
        ["a.wav", "--batch-size", "0"],
    ],
)
def test_usage_errors(cli, argv, capsys):
    with pytest.raises(SystemExit) as e:
        transcribe.main(argv)
    assert e.value.code == 2
    assert "usage:" in capsys.readouterr().err
