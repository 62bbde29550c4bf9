"""MetricsWriter files (JSONL and TensorBoard events), throughput, FLOPs and MFU."""

from __future__ import annotations

import io
import json
import math
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from jaxasr.training import metrics
from jaxasr.training.metrics import (
    MetricsWriter,
    ProgressBar,
    Throughput,
    measured_matmul_peak,
    mfu,
    step_flops,
)


def _event_class():
    """TensorFlow's Event message (the fields we use), built with the protobuf runtime so the
    test decodes with a real protobuf parser rather than with our own encoder's mirror image."""
    f = descriptor_pb2.FileDescriptorProto(name="test_event.proto", package="t", syntax="proto3")
    F = descriptor_pb2.FieldDescriptorProto
    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED

    def msg(name, *fields):
        m = f.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            m.field.add(name=fname, number=number, type=ftype, label=label, type_name=type_name)

    msg("Dim", ("size", 1, F.TYPE_INT64, opt, None))
    msg("Shape", ("dim", 2, F.TYPE_MESSAGE, rep, ".t.Dim"))
    msg("Tensor", ("dtype", 1, F.TYPE_INT32, opt, None), ("tensor_shape", 2, F.TYPE_MESSAGE, opt, ".t.Shape"),
        ("string_val", 8, F.TYPE_BYTES, rep, None))
    msg("PluginData", ("plugin_name", 1, F.TYPE_STRING, opt, None))
    msg("Metadata", ("plugin_data", 1, F.TYPE_MESSAGE, opt, ".t.PluginData"))
    msg("Value", ("tag", 1, F.TYPE_STRING, opt, None), ("simple_value", 2, F.TYPE_FLOAT, opt, None),
        ("tensor", 8, F.TYPE_MESSAGE, opt, ".t.Tensor"), ("metadata", 9, F.TYPE_MESSAGE, opt, ".t.Metadata"))
    msg("Summary", ("value", 1, F.TYPE_MESSAGE, rep, ".t.Value"))
    msg("Event", ("wall_time", 1, F.TYPE_DOUBLE, opt, None), ("step", 2, F.TYPE_INT64, opt, None),
        ("file_version", 3, F.TYPE_STRING, opt, None), ("summary", 5, F.TYPE_MESSAGE, opt, ".t.Summary"))
    for m in f.message_type:
        for field in m.field:
            if not field.type_name:
                field.ClearField("type_name")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Event"))


def _read_events(path):
    Event = _event_class()
    data = io.BytesIO(path.read_bytes())
    events = []
    while header := data.read(8):
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data.read(4))
        assert header_crc == metrics._masked_crc(header)
        payload = data.read(length)
        (payload_crc,) = struct.unpack("<I", data.read(4))
        assert payload_crc == metrics._masked_crc(payload)
        event = Event()
        event.ParseFromString(payload)
        events.append(event)
    return events


def test_crc32c_known_vector():
    assert metrics.crc32c(b"123456789") == 0xE3069283  # RFC 3720 check value
    assert metrics.crc32c(b"") == 0


def test_jsonl_lines(tmp_path):
    with MetricsWriter(tmp_path) as w:
        w.write(10, {"loss": 1.5, "lr": np.float32(0.25), "tokens": np.int64(7), "acc": jnp.asarray(0.5)})
        w.write(20, {"loss": float("nan"), "grad_norm": float("inf"), "x": -math.inf})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first.pop("time") > 1e9
    assert first == {"step": 10, "loss": 1.5, "lr": 0.25, "tokens": 7, "acc": 0.5}
    assert type(first["tokens"]) is int
    assert {k: second[k] for k in ("step", "loss", "grad_norm", "x")} == {
        "step": 20, "loss": "nan", "grad_norm": "inf", "x": "-inf"}


def test_reserved_names(tmp_path):
    with MetricsWriter(tmp_path) as w, pytest.raises(ValueError, match="reserved"):
        w.write(1, {"step": 2.0})


def test_tensorboard_events_read_back(tmp_path):
    w = MetricsWriter(tmp_path)
    w.write(3, {"train/loss": 2.5, "train/lr": 1e-3})
    w.write(4, {"train/loss": 2.25})
    w.write_text(5, "eval/sample", "hello world")
    w.close()
    files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 1
    events = _read_events(files[0])
    assert events[0].file_version == "brain.Event:2"
    scalars = [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value if not v.HasField("tensor")]
    assert scalars == [(3, "train/loss", 2.5), (3, "train/lr", pytest.approx(1e-3)), (4, "train/loss", 2.25)]
    (text,) = [(e.step, v) for e in events for v in e.summary.value if v.HasField("tensor")]
    assert text[0] == 5 and text[1].tag == "eval/sample"
    assert text[1].metadata.plugin_data.plugin_name == "text"
    assert text[1].tensor.dtype == 7 and text[1].tensor.string_val == [b"hello world"]
    assert all(e.wall_time > 1e9 for e in events)
    assert json.loads((tmp_path / "text.jsonl").read_text())["text"] == "hello world"


def test_disabled_writer_writes_nothing(tmp_path):
    w = MetricsWriter(tmp_path / "run", enabled=False)
    w.write(1, {"loss": 1.0})
    w.write_text(1, "t", "x")
    w.flush()
    w.close()
    assert not (tmp_path / "run").exists()


def test_progress_bar_postfix():
    out = io.StringIO()
    bar = ProgressBar(100, initial_step=10, file=out, log_interval_s=0)
    bar.update(20, loss=1.23456, lr=3e-4, examples_per_s=12.5)
    bar.close()
    text = out.getvalue()
    assert "20/100" in text and "loss=1.2346" in text and "lr=3.00e-04" in text and "ex/s=12.5" in text
    quiet = io.StringIO()
    bar = ProgressBar(10, 0, disable=True, file=quiet)
    bar.update(5, loss=1.0)
    bar.close()
    assert quiet.getvalue() == ""


def test_throughput_ignores_first_step(monkeypatch):
    clock = iter([100.0, 101.0, 103.0])  # first add, then rates() twice
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    t = Throughput()
    assert t.rates() == {}
    t.add(examples=999, tokens=9999)  # compile step: only starts the clock at t=100
    t.add(examples=8, tokens=80)
    t.add(examples=8, tokens=80)
    assert t.rates() == {"examples_per_s": 16.0, "tokens_per_s": 160.0, "step_seconds": 0.5}
    t.add(examples=4)
    assert t.rates() == {"examples_per_s": 2.0, "tokens_per_s": 0.0, "step_seconds": 2.0}


def test_step_flops_of_matmul():
    m, k, n = 128, 256, 64
    compiled = jax.jit(jnp.dot).lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
    assert step_flops(compiled) == pytest.approx(2 * m * n * k, rel=0.01)


def test_step_flops_return_forms():
    class Fake:
        def __init__(self, cost):
            self.cost = cost

        def cost_analysis(self):
            if isinstance(self.cost, Exception):
                raise self.cost
            return self.cost

    assert step_flops(Fake([{"flops": 10.0}])) == 10.0
    assert step_flops(Fake({"flops": 5})) == 5.0
    assert step_flops(Fake({"flops": -1.0})) is None
    assert step_flops(Fake([])) is None
    assert step_flops(Fake(None)) is None
    assert step_flops(Fake(NotImplementedError())) is None


def test_mfu_arithmetic():
    # 8e12 FLOPs in 2 s on 4 devices of 2e12 FLOP/s peak: 4e12 / 8e12 = 0.5
    assert mfu(8e12, 2.0, 2e12, 4) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mfu(1.0, 0.0, 1.0, 1)


def test_measured_matmul_peak_is_plausible():
    peak = measured_matmul_peak(n=128, repeats=2)
    assert math.isfinite(peak) and 1e6 < peak < 1e16
