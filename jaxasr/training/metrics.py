"""What the trainer logs: JSONL + TensorBoard scalars, a progress bar, throughput and MFU.

TensorBoard event files are written here directly (record framing + a few protobuf fields) rather
than through tensorboardX: tensorboardX imports torch whenever it is installed (it is, for the
parity tests), which costs seconds at start-up and loads torch's CUDA libraries into the JAX
process, where they can clash with the ones jaxlib uses. The format is small and stable:
https://github.com/tensorflow/tensorflow/blob/master/tensorflow/core/util/event.proto
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "MetricsWriter",
    "ProgressBar",
    "Throughput",
    "mfu",
    "measured_matmul_peak",
    "step_flops",
]


# ---------------------------------------------------------------------------------------------
# TensorBoard event files


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord framing uses. Pure Python: records here are tiny."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negatives
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None, values: bytes = b"") -> bytes:
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
    if file_version is not None:
        out += _field_bytes(3, file_version.encode())
    if values:
        out += _field_bytes(5, values)  # Event.summary = Summary{repeated Value value = 1}
    return out


def _scalar_value(tag: str, value: float) -> bytes:
    # Summary.Value{tag = 1, simple_value = 2 (float32)}
    body = _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value)
    return _field_bytes(1, body)


def _text_value(tag: str, text: str) -> bytes:
    # Summary.Value{tag = 1, metadata = 9 {plugin_data = 1 {plugin_name = 1: "text"}},
    #               tensor = 8 {dtype = 1: DT_STRING (7), tensor_shape = 2 {dim = 2 {size = 1: 1}},
    #                           string_val = 8}}
    metadata = _field_bytes(1, _field_bytes(1, b"text"))
    shape = _field_bytes(2, _varint(1 << 3 | 0) + _varint(1))
    tensor = _varint(1 << 3 | 0) + _varint(7) + _field_bytes(2, shape) + _field_bytes(8, text.encode())
    body = _field_bytes(1, tag.encode()) + _field_bytes(9, metadata) + _field_bytes(8, tensor)
    return _field_bytes(1, body)


class _EventFile:
    def __init__(self, logdir: Path):
        logdir.mkdir(parents=True, exist_ok=True)
        # Unique per process start, so a resumed run adds a file beside the old one (TensorBoard
        # reads every events.* file in the folder) instead of appending to a half-written one.
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = logdir / name
        self._f = open(self.path, "ab")
        self._f.write(_record(_event(time.time(), 0, file_version="brain.Event:2")))

    def write(self, step: int, values: bytes, wall_time: float) -> None:
        self._f.write(_record(_event(wall_time, step, values=values)))

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()


# ---------------------------------------------------------------------------------------------
# MetricsWriter


def _number(value: Any) -> int | float:
    dtype = getattr(value, "dtype", None)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) or (dtype is not None and np.issubdtype(dtype, np.integer)):
        return int(value)
    return float(value)  # python/numpy floats and 0-d jax/numpy arrays


def _json_number(value: int | float) -> int | float | str:
    # JSON has no NaN/Infinity. We write them as the strings "nan", "inf", "-inf" rather than
    # null: a NaN loss and an infinite grad norm mean different things, and float("nan") /
    # float("inf") read the strings back.
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


class MetricsWriter:
    """Appends scalars to `workdir/metrics.jsonl` and TensorBoard events under `workdir/tb/`.

    Each JSONL line is `{"step": int, "time": unix seconds, name: value, ...}`; non-finite
    values are the strings "nan"/"inf"/"-inf". After a resume a step may appear twice: readers
    should keep the last line per step. Text goes to TensorBoard and `workdir/text.jsonl`, so
    metrics.jsonl stays purely numeric. `enabled=False` (JAX processes other than 0) does nothing
    and creates no files.
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
        self.enabled = enabled
        self.workdir = Path(workdir)
        self._jsonl = self._text = self._tb = None
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")
        self._tb = _EventFile(self.workdir / "tb")

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Logs `scalars` (floats, ints, numpy or 0-d jax values) at `step`."""
        if not self.enabled:
            return
        step = int(step)
        now = time.time()
        values = {}
        for name, value in scalars.items():
            if name in ("step", "time"):
                raise ValueError(f"metric name {name!r} is reserved in metrics.jsonl")
            values[str(name)] = _number(value)
        record = {"step": step, "time": now, **{k: _json_number(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._tb.write(step, b"".join(_scalar_value(k, float(v)) for k, v in values.items()), now)
        # Flushed every call: writes come every N steps, and a crashed run keeps its last metrics.
        self.flush()

    def write_text(self, step: int, tag: str, text: str) -> None:
        """Logs a text (e.g. eval transcripts, the config) at `step`."""
        if not self.enabled:
            return
        now = time.time()
        if self._text is None:
            self._text = open(self.workdir / "text.jsonl", "a", encoding="utf-8")
        self._text.write(json.dumps({"step": int(step), "time": now, "tag": tag, "text": text}) + "\n")
        self._tb.write(int(step), _text_value(tag, text), now)
        self.flush()

    def flush(self) -> None:
        for f in (self._jsonl, self._text, self._tb):
            if f is not None:
                f.flush()

    def close(self) -> None:
        """Flushes and closes the files; further writes are errors. Safe to call twice."""
        for f in (self._jsonl, self._text, self._tb):
            if f is not None:
                f.close()
        self._jsonl = self._text = self._tb = None
        self.enabled = False

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Progress bar and throughput


class ProgressBar:
    """A tqdm bar over training steps whose postfix shows loss, lr and examples/s.

    On a terminal it refreshes twice a second; elsewhere (CI, log files) every `log_interval_s`
    so the log stays readable rather than disappearing.
    """

    def __init__(self, total_steps: int, initial_step: int = 0, *, disable: bool = False,
                 log_interval_s: float = 30.0, file=None):
        from tqdm.auto import tqdm

        file = sys.stderr if file is None else file
        tty = hasattr(file, "isatty") and file.isatty()
        self._bar = tqdm(
            total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
            mininterval=0.5 if tty else log_interval_s, disable=disable, file=file, smoothing=0.1,
        )

    def update(self, step: int, loss: float | None = None, lr: float | None = None,
               examples_per_s: float | None = None) -> None:
        """Moves the bar to `step` (absolute) and updates the postfix."""
        postfix = {}
        if loss is not None:
            postfix["loss"] = f"{float(loss):.4f}"
        if lr is not None:
            postfix["lr"] = f"{float(lr):.2e}"
        if examples_per_s is not None:
            postfix["ex/s"] = f"{float(examples_per_s):.1f}"
        if postfix:
            # refresh=False: set_postfix(refresh=True) redraws immediately, ignoring mininterval.
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(int(step) - self._bar.n)

    def write(self, message: str) -> None:
        """Prints a line above the bar without breaking it."""
        self._bar.write(message)

    def close(self) -> None:
        self._bar.close()


class Throughput:
    """Examples/s and tokens/s over the steps since the last `rates()` call.

    Call `add()` after each step and `rates()` where you log, after the step's outputs are ready
    (e.g. after fetching the loss): JAX dispatches asynchronously, so an unsynchronised clock
    measures dispatch, not compute. The first `add()` only starts the clock, so the first step
    (compile-dominated) is never counted.
    """

    def __init__(self) -> None:
        self._t0: float | None = None
        self._steps = 0
        self._examples = 0
        self._tokens = 0

    def add(self, examples: int, tokens: int = 0) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()
            return
        self._steps += 1
        self._examples += int(examples)
        self._tokens += int(tokens)

    def rates(self) -> dict[str, float]:
        """`{"examples_per_s", "tokens_per_s", "step_seconds"}` since the last call (then resets);
        empty before two `add()` calls."""
        if self._t0 is None or self._steps == 0:
            return {}
        now = time.perf_counter()
        elapsed = max(now - self._t0, 1e-12)
        out = {
            "examples_per_s": self._examples / elapsed,
            "tokens_per_s": self._tokens / elapsed,
            "step_seconds": elapsed / self._steps,
        }
        self._t0, self._steps, self._examples, self._tokens = now, 0, 0, 0
        return out


# ---------------------------------------------------------------------------------------------
# FLOPs and MFU


def mfu(flops_per_step: float, step_seconds: float, peak_flops_per_device: float,
        num_devices: int) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the devices' peak.

    `flops_per_step` is the whole step's count over all devices (for an SPMD program,
    `step_flops(compiled) * num_devices`, since XLA reports one device's share).
    """
    if step_seconds <= 0 or peak_flops_per_device <= 0 or num_devices <= 0:
        raise ValueError("step_seconds, peak_flops_per_device and num_devices must be positive")
    return flops_per_step / step_seconds / (peak_flops_per_device * num_devices)


def measured_matmul_peak(dtype=None, n: int = 2048, repeats: int = 3, *,
                         iters: int | None = None) -> float:
    """Achieved peak: the FLOP/s of a jitted n×n `jnp.dot` on the default device, best of `repeats`.

    Not the spec-sheet peak: it is what XLA reaches on this machine for a large dense matmul
    (at default matmul precision, so TF32 where the GPU uses it for float32). We use it as the
    MFU denominator where no spec sheet applies (CPU). Each timed call chains `iters` dependent
    matmuls (default 1 on CPU, 16 elsewhere) so dispatch overhead does not dominate on fast
    accelerators.
    """
    import jax
    import jax.numpy as jnp

    dtype = jnp.float32 if dtype is None else dtype
    if iters is None:
        iters = 1 if jax.default_backend() == "cpu" else 16
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype)
    # Scaled so repeated products keep their magnitude (no overflow in low precision).
    b = (jax.random.normal(kb, (n, n), jnp.float32) / math.sqrt(n)).astype(dtype)

    @jax.jit
    def chain(a, b):
        # Each product depends on the last, so XLA cannot hoist or merge them.
        return jax.lax.fori_loop(0, iters, lambda _, c: jnp.dot(c, b), a)

    chain(a, b).block_until_ready()  # compile and warm up
    best = math.inf
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        chain(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 * iters / best


def step_flops(compiled: Any) -> float | None:
    """FLOPs XLA estimates for one call of `jax.jit(f).lower(...).compile()`, or None if unknown.

    For a sharded (SPMD) program this is ONE device's share. XLA counts a while loop's body once,
    so a step using `scan` over layers (or `fori_loop`) is undercounted by about the trip count:
    compute model FLOPs analytically for those.
    """
    try:
        cost = compiled.cost_analysis()
    except NotImplementedError:
        return None
    # Older jax returned a list with one dict per executable module; current jax a dict.
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not isinstance(cost, Mapping):
        return None
    flops = cost.get("flops")
    if flops is None or flops < 0:  # some backends report -1 for "unknown"
        return None
    return float(flops)
