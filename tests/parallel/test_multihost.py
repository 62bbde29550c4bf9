"""Multi-controller training on localhost: 2 processes x 4 simulated CPU devices, joined by
`jax.distributed` through `launch/local.sh`, against 1 process x 8 devices on the same config.

- the losses of 7 steps match (5 steps, checkpoint, then a resumed run for steps 6-7), and so does
  the WER of the whole eval set (each process decodes half, edit counts are summed);
- the processes' batches together are exactly the rows one process would batch;
- kill -9 of one process makes the other stop with an error within a bounded time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "launch" / "local.sh"
BASE_CONFIG = REPO / "tests" / "training" / "train_config.py"
# Fast compiles; the same flags on both sides of every comparison, so the numerics are comparable.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
HEARTBEAT_S = 10


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CONFIG = """
import importlib.util

from jaxasr.data.pipeline import dataset_config

_spec = importlib.util.spec_from_file_location("_base_train_config", {base!r})
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
    c = _base.get_config()
    c.model.init = {model!r}
    c.data.train.speech.path = {data!r}
    c.data.batch_size = 8  # one row per device, 4 per process
    c.data.label_buckets = (16, 32)  # labels are 11-18 tokens: processes pick different buckets, must agree
    c.train.steps = 7
    c.train.checkpoint_every = 2
    c.train.async_checkpoints = True
    c.train.eval_every = 1000  # eval only at the end (the whole 12-clip set, split over the processes)
    c.eval.sets = {{"dev": dataset_config(source="arrayrecord", path={data!r})}}
    c.distributed.heartbeat_timeout = {heartbeat}
    c.distributed.initialization_timeout = 120
    return c
"""


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, small_whisper_dir, speech_records) -> Path:
    path = tmp_path_factory.mktemp("multihost_config") / "config.py"
    path.write_text(CONFIG.format(base=str(BASE_CONFIG), model=str(small_whisper_dir), data=str(speech_records),
                                  heartbeat=HEARTBEAT_S))
    return path


def _env(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXASR_")}
    return {**env, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "PYTHON": sys.executable,
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_XLA}"}


def _single(config: Path, workdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxasr.train", "--config", str(config), "--workdir", str(workdir),
                           *overrides], env=_env(8), capture_output=True, text=True, timeout=900, cwd=REPO)


def _local(n: int, config: Path, workdir: Path, *overrides: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(LOCAL), str(n), str(config), str(workdir), *overrides],
                            env=_env(8 // n), cwd=REPO, start_new_session=True, **popen)


def _logs(workdir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted((workdir / "logs").glob("*.log")))


def _run_local(n: int, config: Path, workdir: Path, *overrides: str) -> None:
    proc = _local(n, config, workdir, *overrides, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        rc = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 0, _logs(workdir)


def _losses(workdir: Path) -> dict[int, float]:
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if "train/loss" in row:
            out.setdefault(row["step"], []).append(row["train/loss"])
    return out


def _steps(workdir: Path) -> list[int]:
    ckpts = workdir / "checkpoints"
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []


def test_process_shares_make_up_the_single_process_batches(speech_records, tiny_en_checkpoint):
    """Pipeline level: rows of process 0 and 1 (4 each) == the 8 rows one process batches, for
    several batches across epoch boundaries (12 clips, 8 rows a batch)."""
    from jaxasr.data.pipeline import build_train_iter
    from jaxasr.data.text import WhisperTargets

    cfg = _load(BASE_CONFIG, "_base_train_config").get_config()
    cfg.data.train.speech.path = str(speech_records)
    cfg.data.batch_size = 8
    targets = WhisperTargets(tiny_en_checkpoint.tokenizer, tiny_en_checkpoint.generation_config,
                             max_label_tokens=cfg.data.max_label_tokens)

    def take(index, count, n=4):
        it = iter(build_train_iter(cfg.data, targets, n_mels=80, process_index=index, process_count=count))
        return [next(it) for _ in range(n)]

    def rows(batch):
        return sorted(zip(map(tuple, batch["labels"]), (f.tobytes() for f in batch["features"])))

    single = take(0, 1)
    halves = [take(i, 2) for i in (0, 1)]
    for k, whole in enumerate(single):
        assert halves[0][k]["labels"].shape[0] == halves[1][k]["labels"].shape[0] == 4
        assert rows(whole) == sorted(rows(halves[0][k]) + rows(halves[1][k])), k


ROUTING = """
import numpy as np, jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxasr.parallel import distributed
distributed.initialize(None)  # from JAXASR_* in the environment, as launch/local.sh sets them
from jaxasr.parallel.mesh import make_mesh, replicated
from jaxasr.training.evaluation import _map_batches

# FSDP: the kernel is split over all 8 devices of both processes, so the program is collective;
# a host-local NumPy batch (what a single process passes) would mix the processes' rows.
mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
model = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
kernel, bias = np.asarray(model.kernel.value), np.asarray(model.bias.value)
model.kernel.value = jax.device_put(model.kernel.value, NamedSharding(mesh, P("fsdp", None)))
model.bias.value = jax.device_put(model.bias.value, replicated(mesh))
p = jax.process_index()
n = (7, 3)[p]  # uneven shares: process 1 runs an all-padding chunk to keep the collectives in step
features = np.random.default_rng(p).standard_normal((n, 8)).astype(np.float32)
out = _map_batches(lambda x: nnx.jit(lambda m, x: m(x))(model, x), model, features, 2, np.float32)
np.testing.assert_allclose(out, features @ kernel + bias, atol=1e-5)
print("rows back where they came from", p, out.shape)
"""


def test_eval_batches_return_each_process_its_own_rows(tmp_path):
    """Decoding in eval: each process's rows go into one global batch and come back to it."""
    env = {**_env(4), "JAXASR_COORDINATOR": f"127.0.0.1:{_free_port()}", "JAXASR_NUM_PROCESSES": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", ROUTING], env={**env, "JAXASR_PROCESS_ID": str(i)}, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    outs = [proc.communicate(timeout=300)[0] for proc in procs]
    for i, (proc, out) in enumerate(zip(procs, outs)):
        assert proc.returncode == 0 and f"rows back where they came from {i}" in out, out[-3000:]


ENCODE_SHARED = """
import json, sys
import jax, numpy as np
from flax import nnx
from jaxasr.parallel import distributed
distributed.initialize(None)  # from JAXASR_* in the environment (absent: one process)
from jaxasr.convert.sources import load_checkpoint
from jaxasr.data.sources import make_source
from jaxasr.data.pipeline import dataset_config
from jaxasr.parallel.mesh import make_mesh, replicated
from jaxasr.training import encoder_cache

model = load_checkpoint(sys.argv[1]).build()
nnx.update(model, jax.device_put(nnx.state(model), replicated(make_mesh({"data": -1, "fsdp": 1, "tensor": 1}))))
source = make_source(dataset_config(source="arrayrecord", path=sys.argv[2]))
examples = [source[i] for i in range(len(source))]
examples.append({"id": "bad", "audio_bytes": b"not audio", "text": "x"})  # a skip marker, in place
calls = []
encode = encoder_cache.encode_features
encoder_cache.encode_features = lambda m, f, b: calls.append(len(f)) or encode(m, f, b)
out = encoder_cache.encode_examples(model, examples, n_mels=model.cfg.num_mel_bins, batch_size=4,
                                    process_index=jax.process_index(), process_count=jax.process_count())
# A digest per clip: its total magnitude and a corner of values (the plain sum of a layer-normed output is ~0).
digest = lambda x: [float(np.abs(x.astype(np.float64)).sum())] + x[:3, :3].astype(float).ravel().tolist()
print(json.dumps({"encoded_here": sum(calls), "sums": [digest(ex["encoded"]) if "encoded" in ex else None for ex in out],
                  "ids": [ex.get("id") for ex in out]}))
"""


def test_processes_share_the_encoder_cache(tmp_path, small_whisper_dir, speech_records):
    """Frozen-encoder recipe on 2 processes: each encodes half the clips, both end with all of them,
    equal to what one process computes alone (bad clips stay skip markers in place)."""
    args = [sys.executable, "-c", ENCODE_SHARED, str(small_whisper_dir), str(speech_records)]
    one = subprocess.run(args, env=_env(4), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    alone = json.loads(one.stdout.strip().splitlines()[-1])
    env = {**_env(4), "JAXASR_COORDINATOR": f"127.0.0.1:{_free_port()}", "JAXASR_NUM_PROCESSES": "2"}
    procs = [subprocess.Popen(args, env={**env, "JAXASR_PROCESS_ID": str(i)}, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = [proc.communicate(timeout=300) for proc in procs]
    shared = []
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-3000:]
        shared.append(json.loads(out.strip().splitlines()[-1]))
    assert alone["encoded_here"] == 12 and [r["encoded_here"] for r in shared] == [6, 6]
    assert alone["sums"][-1] is None and alone["ids"][:-1] == [r for r in shared[0]["ids"][:-1]]
    for result in shared:
        assert result["ids"] == alone["ids"] and result["sums"][-1] is None
        np.testing.assert_allclose(np.array(result["sums"][:-1]), np.array(alone["sums"][:-1]), rtol=2e-3, atol=2e-3)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one_then_resume(tmp_path, config_file):
    t0 = time.perf_counter()
    one = tmp_path / "one"
    done = _single(config_file, one)  # 1 process, 8 devices, 7 steps
    assert done.returncode == 0, done.stderr[-4000:]
    t1 = time.perf_counter()

    two = tmp_path / "two"
    _run_local(2, config_file, two, "--config.train.steps=5")  # 2 processes x 4 devices, 5 steps
    assert _steps(two) == [4, 5]  # saved collectively at 2, 4 and the last step; keep 2
    for step in (4, 5):  # one Grain iterator state per process
        assert sorted(p.name for p in (two / "checkpoints" / str(step) / "data").iterdir()
                      if p.name.startswith("process_")) == ["process_0-of-2.json", "process_1-of-2.json"], step
    t2 = time.perf_counter()
    _run_local(2, config_file, two)  # resumes at step 5, trains steps 6 and 7
    t3 = time.perf_counter()
    for i in (0, 1):
        assert "resumed from step 5" in (two / "logs" / f"process_{i}.log").read_text()

    expected, got = _losses(one), _losses(two)
    assert all(len(v) == 1 for v in got.values()), "only process 0 writes metrics, each step once"
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5, 6, 7]
    rel = {s: abs(got[s][0] - expected[s][0]) / abs(expected[s][0]) for s in expected}
    print(f"\nmultihost: max relative loss difference {max(rel.values()):.2e} over steps 1-7 "
          f"(per step {', '.join(f'{s}: {r:.1e}' for s, r in sorted(rel.items()))}); "
          f"1 process {t1 - t0:.0f} s, 2 processes 5 steps {t2 - t1:.0f} s, resume to 7 {t3 - t2:.0f} s")
    assert max(rel.values()) <= 1e-5, rel

    summary_one = json.loads((one / "summary.json").read_text())
    summary_two = json.loads((two / "summary.json").read_text())
    assert summary_two["steps"] == 7 and summary_two["stopped"] == "finished"
    # WER of the whole set: 12 clips decoded as 2 x 6, edit counts summed over the processes.
    assert summary_two["final"]["dev/utterances"] == summary_one["final"]["dev/utterances"] == 12
    assert summary_two["final"]["dev/wer"] == pytest.approx(summary_one["final"]["dev/wer"], abs=1e-6)
    assert summary_two["final"]["dev/cer"] == pytest.approx(summary_one["final"]["dev/cer"], abs=1e-6)


@contextlib.contextmanager
def _training_until_first_step(workdir: Path, config: Path):
    """A long 2-process run, yielded as (launcher, {process id: pid}) once it has logged a step;
    whatever is still running on exit is killed."""
    proc = _local(2, config, workdir, "--config.train.steps=100000", "--config.train.checkpoint_every=100000",
                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and not ((workdir / "metrics.jsonl").is_file() and _losses(workdir)):
            assert proc.poll() is None, proc.stderr.read()[-3000:] + _logs(workdir)
            time.sleep(0.5)
        assert _losses(workdir), "no training step within 600 s"
        yield proc, dict(line.split() for line in (workdir / "logs" / "pids").read_text().splitlines())
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("victim", [1, 0])
def test_when_one_process_dies_the_other_stops_with_an_error(tmp_path, config_file, victim):
    """kill -9 of a worker (1) or of the process hosting the coordinator (0): the survivor must exit
    non-zero by itself, within the heartbeat timeout plus a margin, saying why."""
    with _training_until_first_step(tmp_path, config_file) as (proc, pids):
        os.kill(int(pids[str(victim)]), signal.SIGKILL)
        killed = time.perf_counter()
        proc.wait(timeout=HEARTBEAT_S + 80)
        elapsed = time.perf_counter() - killed
    survivor = 1 - victim
    log = (tmp_path / "logs" / f"process_{survivor}.log").read_text()
    launcher = proc.stderr.read()
    print(f"\nmultihost: process {victim} killed, process {survivor} exited after {elapsed:.1f} s; "
          f"last log lines:\n{log[-1500:]}\nlauncher: {launcher[-500:]}")
    assert proc.returncode != 0
    assert f"process {survivor} (pid {pids[str(survivor)]}) exited with status" in launcher
    assert elapsed <= HEARTBEAT_S + 80
    assert any(m in log.lower() for m in ("heartbeat", "another task died", "distributed service",
                                          "coordination service", "unavailable")), log[-3000:]


def test_sigterm_to_one_process_stops_all_at_the_same_step(tmp_path, config_file):
    """A signal reaching one host (or the hosts at different steps) must not split the job: all
    processes agree to stop after the same step, save that checkpoint together and exit 0."""
    with _training_until_first_step(tmp_path, config_file) as (proc, pids):
        os.kill(int(pids["1"]), signal.SIGTERM)
        proc.wait(timeout=600)
    assert proc.returncode == 0, proc.stderr.read()[-3000:] + _logs(tmp_path)
    last = _steps(tmp_path)[-1]
    assert last >= max(_losses(tmp_path))
    for i in (0, 1):
        assert f"SIGTERM at step {last}" in (tmp_path / "logs" / f"process_{i}.log").read_text(), i
