"""`python -m jaxasr.train` end to end: losses, kill -9 and resume, SIGTERM, config errors, export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

CONFIG = str(Path(__file__).with_name("train_config.py"))
REPO = Path(__file__).resolve().parents[2]


def _cmd(workdir: Path, model: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jaxasr.train", "--config", CONFIG, "--workdir", str(workdir),
            f"--config.model.init={model}", f"--config.data.train.speech.path={data}", *extra]


# Compile time dominates these short runs; both flags cut it 2-3x (every run compared uses them).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def _env() -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "XLA_FLAGS": FAST_COMPILE}


def _losses(workdir: Path) -> dict[int, float]:
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out[row["step"]] = row["train/loss"]  # a resumed run may log a step again: keep the last
    return out


def _steps(workdir: Path) -> list[int]:
    ckpts = workdir / "checkpoints"
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_whisper_dir, speech_records) -> Path:
    workdir = tmp_path_factory.mktemp("run_a")
    done = subprocess.run(_cmd(workdir, small_whisper_dir, speech_records), env=_env(), capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


def test_run_logs_losses_and_keeps_last_checkpoints(uninterrupted):
    losses = _losses(uninterrupted)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(v) for v in losses.values())
    assert losses[6] < losses[1]  # lr 1e-3 on 4 clips: the loss must come down
    assert _steps(uninterrupted) == [4, 6]  # keep_checkpoints=2
    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["stopped"] == "finished"
    assert list((uninterrupted / "tb").glob("events.out.tfevents.*"))


def test_kill_9_then_resume_reproduces_the_losses(tmp_path, uninterrupted, small_whisper_dir, speech_records):
    proc = subprocess.Popen(_cmd(tmp_path, small_whisper_dir, speech_records,
                                 "--config.train.steps=60", "--config.train.async_checkpoints=false"),
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    deadline = time.time() + 300
    while time.time() < deadline and not any(s >= 2 for s in _steps(tmp_path)):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_steps(tmp_path))
    assert killed_at < 60
    done = subprocess.run(_cmd(tmp_path, small_whisper_dir, speech_records), env=_env(), capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from step {killed_at}" in done.stderr
    expected, got = _losses(uninterrupted), _losses(tmp_path)
    for step in range(killed_at + 1, 7):
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step


def test_sigterm_saves_and_exits_zero(tmp_path, small_whisper_dir, speech_records):
    proc = subprocess.Popen(_cmd(tmp_path, small_whisper_dir, speech_records, "--config.train.steps=100000",
                                 "--config.train.checkpoint_every=100000"),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.time() + 300
    while time.time() < deadline and not _losses_or_empty(tmp_path):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM" in out
    steps = _steps(tmp_path)
    assert steps and steps[-1] >= max(_losses(tmp_path))


def _losses_or_empty(workdir: Path) -> dict[int, float]:
    return _losses(workdir) if (workdir / "metrics.jsonl").is_file() else {}


@pytest.mark.parametrize("flag, message", [
    ("--config.optimizer.peak_lrr=1e-3", "did you mean 'optimizer.peak_lr'"),
    ("--config.train.steps=many", "train.steps"),
])
def test_bad_config_fails_at_once_naming_the_key(tmp_path, flag, message):
    done = subprocess.run([sys.executable, "-m", "jaxasr.train", "--config", CONFIG, "--workdir", str(tmp_path), flag],
                          env=_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2
    assert message in done.stderr


def test_export_loads_in_transformers_with_the_trained_weights(tmp_path, uninterrupted):
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from jaxasr.export import checkpoint_from_workdir, main

    assert main(["--workdir", str(uninterrupted), "--step", "6", "--out", str(tmp_path / "hf")]) == 0
    ckpt, step = checkpoint_from_workdir(uninterrupted, step=6)
    model = ckpt.build()
    hf = WhisperForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    WhisperProcessor.from_pretrained(tmp_path / "hf")
    rng = np.random.default_rng(0)
    features = rng.standard_normal((1, 80, 3000)).astype(np.float32)
    ids = np.asarray([[50257, 50362, 383, 6193]], np.int32)
    with torch.no_grad():
        ref = hf(input_features=torch.from_numpy(features), decoder_input_ids=torch.from_numpy(ids).long()).logits
    ours = np.asarray(model(features, ids))
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-4)


def test_lora_run_trains_only_adapters_and_exports(tmp_path, small_whisper_dir, speech_records):
    import torch
    from peft import PeftModel
    from transformers import WhisperForConditionalGeneration

    from jaxasr.export import main, restore_run

    done = subprocess.run(_cmd(tmp_path / "run", small_whisper_dir, speech_records, "--config.train.steps=2",
                               "--config.model.lora.targets=('(q_proj|v_proj)$',)", "--config.model.lora.rank=4",
                               "--config.model.lora.dropout=0.1"),
                          env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    model, _, _, step = restore_run(tmp_path / "run")
    assert step == 2
    # 2 stacks x (q, v) adapters: A [L, 64, 4] + B [L, 4, 2, 32] per projection, encoder (1 layer) + decoder (2)
    assert summary["trainable_params"] == (1 + 2 + 2) * 2 * (64 * 4 + 4 * 64)
    assert main(["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--peft"]) == 0
    base = WhisperForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    peft_model = PeftModel.from_pretrained(base, tmp_path / "hf" / "adapter").eval()
    features = np.random.default_rng(0).standard_normal((1, 80, 3000)).astype(np.float32)
    ids = np.asarray([[50257, 50362, 383, 6193]], np.int32)
    with torch.no_grad():
        ref = peft_model(input_features=torch.from_numpy(features), decoder_input_ids=torch.from_numpy(ids).long()).logits
    np.testing.assert_allclose(np.asarray(model(features, ids)), ref.numpy(), atol=1e-4)


def test_cached_encoder_trains_like_the_frozen_encoder(tmp_path, small_whisper_dir, speech_records):
    """train.cache_encoder (encoder outputs computed once per clip, float16) gives the losses of
    running the frozen encoder at every step; it refuses an encoder that would train."""
    frozen = ("--config.train.steps=3", "--config.optimizer.freeze=('^encoder/',)")
    runs = {}
    for name, extra in (("live", ()), ("cached", ("--config.train.cache_encoder=True",))):
        done = subprocess.run(_cmd(tmp_path / name, small_whisper_dir, speech_records, *frozen, *extra), env=_env(),
                              capture_output=True, text=True, timeout=600, cwd=REPO)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = _losses(tmp_path / name)
    assert sorted(runs["cached"]) == sorted(runs["live"]) == [1, 2, 3]
    np.testing.assert_allclose([runs["cached"][s] for s in (1, 2, 3)], [runs["live"][s] for s in (1, 2, 3)], rtol=2e-3)

    refused = subprocess.run(_cmd(tmp_path / "bad", small_whisper_dir, speech_records, "--config.train.steps=1",
                                  "--config.train.cache_encoder=True"), env=_env(), capture_output=True, text=True,
                             timeout=600, cwd=REPO)
    assert refused.returncode != 0 and "train.cache_encoder needs a frozen encoder" in refused.stderr
