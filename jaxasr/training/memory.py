"""Memory at scale, on paper and checked: the train step compiled ahead of time, never run.

`plan(...)` builds the step of `jaxasr.training.step.TrainStep` abstractly (`TrainStep.abstract`:
shapes and shardings only, nothing allocated), so a whisper-large-v3 step for 8 or 256 devices
can be planned on a laptop. It reports, per device:

- parameters and optimizer state, exactly, from their shardings (the sum over leaves of one
  shard's size times the item size: what each device holds);
- from XLA's compiled memory analysis (`compiled.memory_analysis()`): arguments, outputs,
  aliased (donated parameters and optimizer state reused for the outputs), temporaries (the
  activations kept for the backward pass, gradients and every other intermediate), generated
  code, and the peak: arguments + outputs - aliased + temporaries + code, the figure XLA's own
  buffer assignment bounds the step by (backends that report `peak_memory_in_bytes` give it too).

Measured on XLA:CPU (8 simulated devices): rematerialization lowers the temporaries only with
`scan_layers=True` (large-v3, batch 16: 42.4 -> 4.8 GiB per device); over unrolled layers the CPU
compiler's schedule keeps about as much live with `remat='full'` as without (tiny: 1.92 vs 1.99 GiB).

`format_plan(plan(...))` is the table `tools/plan_memory.py` prints. The host platform's figures
are those of the CPU compiler (which e.g. may widen bfloat16 temporaries); a GPU or TPU host gives
its own backend's.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxasr.models.whisper import Whisper, WhisperConfig
from jaxasr.parallel.mesh import MESH_AXES, batch_sharding, make_mesh
from jaxasr.training.optimizer import build_optimizer, resolve_config
from jaxasr.training.step import TrainStep, trainable_filter

DEFAULT_OPTIMIZER = {"name": "adamw", "peak_lr": 1e-5}
_STATS = ("argument", "output", "alias", "temp", "generated_code")


def whisper_config(model: str | WhisperConfig, *, remat: str = "none", scan: bool = False,
                   dtype: str = "float32", param_dtype: str = "float32") -> WhisperConfig:
    """A preset name ('large-v3', ...) or a config, with the runtime switches applied."""
    cfg = WhisperConfig.preset(model) if isinstance(model, str) else model
    return dataclasses.replace(cfg, remat_policy=remat, scan_layers=scan, dtype=dtype, param_dtype=param_dtype)


def parse_mesh(mesh: str | Sequence[int] | Mapping[str, int]) -> dict[str, int]:
    """'1,8,1' (data, fsdp, tensor), a sequence or a mapping -> {axis: size}."""
    if isinstance(mesh, str):
        mesh = [int(s) for s in mesh.split(",")]
    if isinstance(mesh, Mapping):
        return {a: int(mesh[a]) for a in MESH_AXES}
    if len(mesh) != len(MESH_AXES):
        raise ValueError(f"mesh {mesh} must give sizes for {MESH_AXES}")
    return dict(zip(MESH_AXES, (int(s) for s in mesh)))


def batch_shapes(cfg: WhisperConfig, batch: int, label_len: int, mesh: jax.sharding.Mesh, *,
                 encoded: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
    """The step's inputs as the host pipeline sends them (dtypes of `data.pipeline`), placed as
    `parallel.mesh.global_batch` places them. `encoded`: precomputed encoder outputs (float16, the
    frozen-encoder recipe) instead of log-mel features."""
    shapes = {
        "decoder_input_ids": ((batch, label_len), jnp.int32),
        "labels": ((batch, label_len), jnp.int32),
        "loss_mask": ((batch, label_len), jnp.float32),
        "is_text": ((batch,), jnp.bool_),
    }
    if encoded:
        shapes["encoded"] = ((batch, cfg.max_source_positions, cfg.d_model), jnp.float16)
    else:
        shapes["features"] = ((batch, cfg.num_mel_bins, cfg.n_audio_frames), jnp.float32)
    return {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sharding(mesh, len(s))) for k, (s, d) in shapes.items()}


def tree_bytes(tree: Any) -> tuple[int, int]:
    """(total bytes, bytes one device holds) of a tree of sharded arrays or ShapeDtypeStructs:
    per device is the sum over leaves of one shard's size times the item size."""
    total = per_device = 0
    for x in jax.tree.leaves(tree):
        item = np.dtype(x.dtype).itemsize
        total += math.prod(x.shape) * item
        sharding = getattr(x, "sharding", None)
        shard = sharding.shard_shape(x.shape) if sharding is not None else x.shape
        per_device += math.prod(shard) * item
    return total, per_device


def abstract_step(cfg: WhisperConfig, mesh: jax.sharding.Mesh, *, freeze: Sequence[str] = (),
                  optimizer: Any = None, label_smoothing: float = 0.0) -> TrainStep:
    """The trainer's step (same optimizer construction, same split, same jit) over abstract weights."""
    model = nnx.eval_shape(lambda: Whisper(cfg, rngs=nnx.Rngs(0)))
    _, trainable, _ = nnx.split(model, trainable_filter(tuple(freeze)), ...)
    opt_cfg = {**resolve_config(dict(optimizer) if optimizer is not None else DEFAULT_OPTIMIZER), "freeze": ()}
    tx, _ = build_optimizer(opt_cfg, trainable)
    return TrainStep.abstract(model, tx, mesh, freeze=tuple(freeze), label_smoothing=label_smoothing)


def memory_stats(compiled: Any) -> dict[str, int]:
    """`compiled.memory_analysis()` as a dict of per-device bytes, with the derived peak."""
    m = compiled.memory_analysis()
    if m is None:
        raise RuntimeError("this backend gives no memory analysis for compiled programs")
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in _STATS}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
    # The backend's own figure: 0 where it does not say; XLA:CPU's leaves the temporaries out.
    out["xla_peak"] = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
    return out


def plan(model: str | WhisperConfig = "large-v3", mesh: str | Sequence[int] | Mapping[str, int] = (1, -1, 1),
         batch: int = 16, label_len: int = 128, *, remat: str = "none", scan: bool = False,
         dtype: str = "float32", param_dtype: str = "float32", freeze: Sequence[str] = (),
         optimizer: Any = None, label_smoothing: float = 0.0, encoded: bool = False,
         compile: bool = True) -> dict[str, Any]:
    """Per-device memory of one train step, without running it (see the module doc).

    `mesh`: sizes of (data, fsdp, tensor) over this process's devices (one may be -1);
    `optimizer`: a `build_optimizer` config (default AdamW); `compile=False` skips XLA and gives
    only the exact parameter and optimizer figures. Returns a dict of ints (bytes) and settings."""
    cfg = whisper_config(model, remat=remat, scan=scan, dtype=dtype, param_dtype=param_dtype)
    mesh_obj = make_mesh(parse_mesh(mesh))
    step = abstract_step(cfg, mesh_obj, freeze=freeze, optimizer=optimizer, label_smoothing=label_smoothing)
    trainable, frozen, opt = (tree_bytes(t) for t in (step.trainable, step.frozen, step.opt_state))
    shapes = batch_shapes(cfg, batch, label_len, mesh_obj, encoded=encoded)
    out: dict[str, Any] = {
        "model": model if isinstance(model, str) else "custom",
        "mesh": dict(mesh_obj.shape),
        "devices": mesh_obj.size,
        "batch": batch, "label_len": label_len, "remat": remat, "scan": scan, "dtype": dtype,
        "param_dtype": param_dtype, "freeze": list(freeze), "encoded": encoded,
        "param_count": sum(math.prod(x.shape) for x in jax.tree.leaves((step.trainable, step.frozen))),
        "trainable_count": sum(math.prod(x.shape) for x in jax.tree.leaves(step.trainable)),
        "trainable_bytes": trainable[0], "trainable_bytes_per_device": trainable[1],
        "frozen_bytes": frozen[0], "frozen_bytes_per_device": frozen[1],
        "param_bytes": trainable[0] + frozen[0], "param_bytes_per_device": trainable[1] + frozen[1],
        "opt_bytes": opt[0], "opt_bytes_per_device": opt[1],
        "batch_bytes": tree_bytes(shapes)[0], "batch_bytes_per_device": tree_bytes(shapes)[1],
    }
    if compile:
        t0 = time.perf_counter()
        lowered = step.lower(shapes)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        out.update(compiled=memory_stats(compiled), lower_s=round(t1 - t0, 2), compile_s=round(t2 - t1, 2))
    return out


def _gib(n: int) -> str:
    return f"{n / 2**30:10.3f} GiB"


def format_plan(p: Mapping[str, Any]) -> str:
    """The plan as a readable table (bytes in GiB, exact byte counts beside them)."""
    n = p["devices"]
    mesh = " x ".join(f"{a}={s}" for a, s in p["mesh"].items())
    head = (f"whisper-{p['model']}  mesh {mesh} ({n} devices)  batch {p['batch']} x {p['label_len']} tokens  "
            f"remat={p['remat']}  scan={p['scan']}  dtype={p['dtype']}  param_dtype={p['param_dtype']}"
            + (f"  freeze={p['freeze']}" if p["freeze"] else "") + ("  encoded inputs" if p["encoded"] else ""))
    lines = [head, f"parameters: {p['param_count']:,} ({p['trainable_count']:,} trainable)", ""]
    row = "{:<44}{:>16}{:>16}{:>16}  {:>15}"
    lines.append(row.format("exact, from the shardings", "total", "per device", "total / devices",
                            "per device (B)"))
    items = [("parameters, trainable", "trainable_bytes"), ("parameters, frozen", "frozen_bytes"),
             ("parameters", "param_bytes"), ("optimizer state", "opt_bytes"), ("batch", "batch_bytes")]
    for label, key in items:
        lines.append(row.format(label, _gib(p[key]), _gib(p[f"{key}_per_device"]), _gib(p[key] // n),
                                f"{p[f'{key}_per_device']:,}"))
    both = p["param_bytes"] + p["opt_bytes"]
    both_dev = p["param_bytes_per_device"] + p["opt_bytes_per_device"]
    lines.append(row.format("parameters + optimizer state", _gib(both), _gib(both_dev), _gib(both // n),
                            f"{both_dev:,}"))
    lines.append(f"  per device / (total / devices) = {both_dev / (both / n):.4f}")
    c = p.get("compiled")
    if c:
        lines += ["", f"compiled memory analysis, per device (lower {p['lower_s']} s, compile {p['compile_s']} s)"]
        row2 = "{:<44}{:>16}  {:>15}"
        stats = [("arguments (params, opt state, batch)", "argument"), ("outputs", "output"),
                 ("aliased (donated, reused by outputs)", "alias"),
                 ("activations / temporaries", "temp"), ("generated code", "generated_code"),
                 ("peak = args + outputs - aliased + temp + code", "peak")]
        if c.get("xla_peak", 0) >= c["argument"] + c["temp"]:  # XLA:CPU's counts the arguments only
            stats.append(("peak, as the backend reports it", "xla_peak"))
        for label, key in stats:
            lines.append(row2.format(label, _gib(c[key]), f"{c[key]:,}"))
    return "\n".join(lines)
