"""The ArrayRecord record format and `prepare` (manifest → validated shards)."""

from __future__ import annotations

import io
import json
import math
import struct

import numpy as np
import pytest
import soundfile as sf

from jaxasr.audio.io import decode_audio_bytes
from jaxasr.data import prepare as prepare_mod
from jaxasr.data.errors import DataError
from jaxasr.data.records import MAGIC, ArrayRecordSource, decode_record, encode_record, write_shards

SR = 16000


@pytest.fixture(scope="module")
def clips(speech_clips):
    return speech_clips[:4]  # a handful is enough; keeps the 2-core machine free


# --------------------------------------------------------------------------- records


@pytest.mark.parametrize("codec", ["flac", "pcm16"])
def test_record_round_trip(clips, codec):
    clip = clips[0]
    pcm = np.round(clip.audio * 32767).astype(np.int16)
    example = {
        "id": "spk1/utt-ü", "audio": pcm, "sample_rate": SR, "text": "Straße, 東京 — naïve café ✓",
        "domain": "medical", "language": "de", "speaker": "spk1", "duration": 1.25,
    }  # fmt: skip
    data = encode_record(example, codec=codec)
    assert data[:4] == MAGIC
    out = decode_record(data)
    for key in ("id", "text", "domain", "language", "speaker", "duration"):
        assert out[key] == example[key], key
    if codec == "pcm16":
        assert out["audio"].dtype == np.int16 and out["sample_rate"] == SR
        np.testing.assert_array_equal(out["audio"], pcm)
    else:
        assert "audio" not in out and out["audio_bytes"][:4] == b"fLaC"
        samples, rate = sf.read(io.BytesIO(out["audio_bytes"]), dtype="int16")
        assert rate == SR
        np.testing.assert_array_equal(samples, pcm)  # FLAC is lossless for int16


def test_record_float_audio_missing_metadata_and_bytes_text():
    audio = np.linspace(-1, 1, 1000, dtype=np.float32)
    out = decode_record(encode_record({"audio": audio, "sample_rate": 8000, "text": b"caf\xe9"}, "pcm16"))
    assert out["text"] == b"caf\xe9"  # not UTF-8: kept as bytes for the pipeline to reject
    assert out["id"] == out["domain"] == out["speaker"] == ""
    assert math.isnan(out["duration"]) and out["sample_rate"] == 8000
    np.testing.assert_allclose(out["audio"] / 32768, audio, atol=1 / 32768)


def test_record_file_codec_keeps_bytes():
    buf = io.BytesIO()
    sf.write(buf, np.zeros(100, np.float32), 22050, format="WAV")
    out = decode_record(encode_record({"audio_bytes": buf.getvalue(), "text": "x"}, codec="file"))
    assert out["audio_bytes"] == buf.getvalue() and "sample_rate" not in out


def test_record_rejects_nan():
    with pytest.raises(DataError) as e:
        encode_record({"audio": np.array([0.0, np.nan], np.float32), "sample_rate": SR, "text": "a"})
    assert e.value.reason == "audio_nonfinite"


def test_record_rejects_garbage():
    with pytest.raises(DataError) as e:
        decode_record(b"RIFF1234")
    assert e.value.reason == "record_invalid"
    good = encode_record({"audio": np.zeros(10, np.int16), "sample_rate": SR, "text": "a"}, "pcm16")
    with pytest.raises(DataError):
        decode_record(good[:-3])  # truncated payload
    with pytest.raises(DataError):
        decode_record(MAGIC + struct.pack("<I", 5) + b"{bad}")


def test_write_shards_order_and_skips(tmp_path):
    items = [{"id": str(i), "audio": np.full(4, i, np.int16), "sample_rate": SR, "text": f"t{i}"} for i in range(7)]
    items[2] = items[3] = None  # skipped positions; shard 1 of 3 keeps only index 4
    shards = write_shards(items, tmp_path, num_shards=3, prefix="x", codec="pcm16")
    assert [s["num_examples"] for s in shards] == [2, 1, 2]
    assert [s["path"].rsplit("/", 1)[1] for s in shards][0] == "x-00000-of-00003.array_record"
    src = ArrayRecordSource(tmp_path)
    assert [src[i]["id"] for i in range(len(src))] == ["0", "1", "4", "5", "6"]
    assert [r["text"] for r in src.__getitems__([4, 0])] == ["t6", "t0"]
    # All of a shard's range skipped: the empty shard is dropped and the others renamed.
    out2 = tmp_path / "b"
    shards = write_shards([items[0], None, None, items[1]], out2, num_shards=4, prefix="y", codec="pcm16")
    assert [s["path"].rsplit("/", 1)[1] for s in shards] == ["y-00000-of-00002.array_record", "y-00001-of-00002.array_record"]
    assert sorted(p.name for p in out2.iterdir()) == ["y-00000-of-00002.array_record", "y-00001-of-00002.array_record"]


# --------------------------------------------------------------------------- prepare


def _bad_inputs(tmp_path, clip):
    """Files for each failure prepare must catch; returns {name: expected reason}."""
    buf = io.BytesIO()
    sf.write(buf, clip.audio, SR, format="FLAC", subtype="PCM_16")
    (tmp_path / "truncated.flac").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (tmp_path / "random.wav").write_bytes(np.random.default_rng(0).bytes(5000))
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), SR, subtype="PCM_16")
    # 8 s at 8 kHz: also checks resampling happens before the length check.
    sf.write(tmp_path / "long.wav", np.zeros(8 * 8000, np.float32), 8000, subtype="PCM_16")
    nan = clip.audio[:1000].copy()
    nan[10] = np.nan
    sf.write(tmp_path / "nan.wav", nan, SR, subtype="FLOAT")
    return {
        "nan.wav": "audio_nonfinite",
        "truncated.flac": "audio_undecodable",
        "random.wav": "audio_undecodable",
        "missing.wav": "audio_missing",
        "empty.wav": "audio_empty",
        "long.wav": "audio_too_long",
    }


def _write_manifest(path, rows, kind):
    """rows: (audio, text bytes, domain); returns the manifest path."""
    if kind == "jsonl":
        lines = [json.dumps({"audio": a, "text": "@@T@@", "domain": d}).encode().replace(b"@@T@@", t) for a, t, d in rows]
        path.write_bytes(b"\n".join(lines) + b"\n")
    else:
        sep = b"\t" if kind == "tsv" else b","
        lines = [sep.join([b"audio", b"text", b"domain"])]
        quote = (lambda t: t) if kind == "tsv" else (lambda t: b'"' + t.replace(b'"', b'""') + b'"')
        lines += [sep.join([a.encode(), quote(t), d.encode()]) for a, t, d in rows]
        path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("kind", ["jsonl", "tsv", "csv"])
def test_prepare_skips_bad_inputs(tmp_path, clips, kind):
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    good = []
    for i, clip in enumerate(clips[:3]):
        sf.write(audio_dir / f"good{i}.wav", clip.audio, SR, subtype="PCM_16")
        good.append((f"audio/good{i}.wav", clip.text.encode(), "chat"))
    expected = _bad_inputs(audio_dir, clips[0])
    bad = [(f"audio/{name}", b"some words", "x") for name in expected]
    # Good audio, bad text: reasons come from the transcript.
    bad += [(f"audio/good0.wav", b"", "x"), (f"audio/good1.wav", b"caf\xe9 au lait", "x")]
    expected.update({"good0.wav#empty": "text_empty", "good1.wav#latin1": "text_not_utf8"})
    rows = [good[0], *bad[:4], good[1], *bad[4:], good[2]]
    assert len(rows) == 3 + 8
    manifest = _write_manifest(tmp_path / f"m.{kind}", rows, kind)

    out = tmp_path / "out"
    report = prepare_mod.prepare(manifest, out, num_shards=2, max_seconds=7.5, progress=False)

    want = {}
    for reason in expected.values():
        want[reason] = want.get(reason, 0) + 1
    assert report["skipped_by_reason"] == want
    assert report["written"] == 3 and report["inputs"] == len(rows)
    assert "audio/missing.wav" in report["skipped_examples"]["audio_missing"]
    assert json.loads((out / "prepare_report.json").read_text())["skipped_by_reason"] == want
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["num_examples"] == 3 and info["codec"] == "flac"
    assert info["total_hours"] == pytest.approx(sum(len(c.audio) for c in clips[:3]) / SR / 3600, rel=1e-6)

    src = ArrayRecordSource(out)
    assert len(src) == 3
    for i in range(3):
        ex = src[i]
        assert ex["text"] == clips[i].text and ex["domain"] == "chat" and ex["id"] == f"audio/good{i}.wav"
        np.testing.assert_allclose(decode_audio_bytes(ex["audio_bytes"]), clips[i].audio, atol=1e-4)


def test_prepare_pcm16_workers_and_resample(tmp_path, clips):
    # 22.05 kHz input: prepare resamples to 16 kHz; two spawn workers keep the order.
    rows = []
    for i, clip in enumerate(clips[:3]):
        import soxr

        sf.write(tmp_path / f"c{i}.wav", soxr.resample(clip.audio, SR, 22050), 22050, subtype="FLOAT")
        rows.append({"audio": str(tmp_path / f"c{i}.wav"), "text": clip.text, "speaker": f"s{i}", "language": "en"})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = prepare_mod.prepare(tmp_path / "m.jsonl", tmp_path / "out", workers=2, codec="pcm16", progress=False)
    assert report["written"] == 3 and report["skipped"] == 0
    src = ArrayRecordSource(str(tmp_path / "out" / "*.array_record"))
    for i in range(3):
        ex = src[i]
        assert ex["speaker"] == f"s{i}" and ex["language"] == "en" and ex["sample_rate"] == SR
        assert ex["audio"].dtype == np.int16
        assert abs(len(ex["audio"]) - len(clips[i].audio)) <= 2
        assert ex["duration"] == pytest.approx(len(ex["audio"]) / SR)


def test_prepare_all_bad_exits_1(tmp_path, capsys):
    (tmp_path / "noise.wav").write_bytes(b"\x00\x01" * 300)
    (tmp_path / "m.tsv").write_bytes(b"noise.wav\thello\nmissing.flac\thi\n")  # no header row
    rc = prepare_mod.main([str(tmp_path / "m.tsv"), str(tmp_path / "out"), "--workers", "1", "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "none of the 2 inputs" in err
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert report["skipped_by_reason"] == {"audio_missing": 1, "audio_undecodable": 1}
    assert not list((tmp_path / "out").glob("*.array_record"))


def test_prepare_cli_ok(tmp_path, clips, capsys):
    sf.write(tmp_path / "a.wav", clips[0].audio, SR, subtype="PCM_16")
    (tmp_path / "m.csv").write_text(f'a.wav,"{clips[0].text}",bank,en,spk,3.0\n')
    rc = prepare_mod.main([str(tmp_path / "m.csv"), str(tmp_path / "out"), "--workers", "1", "--quiet"])
    assert rc == 0
    assert "wrote 1 of 1" in capsys.readouterr().out
    ex = ArrayRecordSource([tmp_path / "out" / "data-00000-of-00001.array_record"])[0]
    assert (ex["text"], ex["domain"], ex["language"], ex["speaker"]) == (clips[0].text, "bank", "en", "spk")
