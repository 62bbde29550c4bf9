"""tools/synthesize.py: text corpus → wavs + manifest (+ ArrayRecord shards)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from jaxasr.data.records import ArrayRecordSource

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "synthesize.py"
SENTENCES = ["Good morning doctor.", "My card was declined.", "The rain stopped at noon.", "Please call me back."]
VOICES = ["en-us", "en-gb+f2"]


def _tool():
    spec = importlib.util.spec_from_file_location("jaxasr_tool_synthesize", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_is_seeded_and_mixes_voices():
    tool = _tool()
    a = tool.plan(SENTENCES, VOICES + ["flite:slt"], [120, 180], [30, 70], seed=3)
    assert a == tool.plan(SENTENCES, VOICES + ["flite:slt"], [120, 180], [30, 70], seed=3)
    assert a != tool.plan(SENTENCES, VOICES + ["flite:slt"], [120, 180], [30, 70], seed=4)
    assert all(j["pitch"] == 50 for j in a if j["voice"].startswith("flite:"))  # flite: no pitch


def test_synthesize_dataset_workers_and_arrayrecord(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n\n", encoding="utf-8")
    common = ["--text", str(corpus), "--voices", *VOICES, "--rates", "150", "190",
              "--pitches", "35", "65", "--seed", "1", "--domain", "bank", "--language", "en"]  # fmt: skip

    serial = tmp_path / "serial"
    assert _tool().main([str(serial), *common]) == 0
    parallel = tmp_path / "parallel"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(parallel), *common, "--workers", "2", "--arrayrecord", "--codec", "pcm16"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr

    rows = [json.loads(line) for line in (parallel / "manifest.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == SENTENCES
    assert {r["voice"] for r in rows} == set(VOICES)  # seed 1 draws both voices
    assert {r["rate"] for r in rows} <= {150, 190} and {r["pitch"] for r in rows} <= {35, 65}
    assert all(r["domain"] == "bank" and r["language"] == "en" and r["speaker"] == r["voice"] for r in rows)
    # Same seed, any number of workers: the same dataset, sample for sample.
    assert (serial / "manifest.jsonl").read_text() == (parallel / "manifest.jsonl").read_text()
    for r in rows:
        audio, rate = sf.read(parallel / r["audio"], dtype="int16")
        assert rate == 16000 and r["duration"] == round(len(audio) / 16000, 3) > 0.5
        np.testing.assert_array_equal(audio, sf.read(serial / r["audio"], dtype="int16")[0])

    src = ArrayRecordSource(parallel / "arrayrecord")
    assert len(src) == len(SENTENCES)
    for r, i in zip(rows, range(len(src))):
        ex = src[i]
        assert ex["text"] == r["text"] and ex["domain"] == "bank" and ex["speaker"] == r["voice"]
        np.testing.assert_array_equal(ex["audio"], sf.read(parallel / r["audio"], dtype="int16")[0])
