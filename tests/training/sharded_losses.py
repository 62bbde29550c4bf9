"""Train a tiny random Whisper for a few steps on given meshes; print losses and grad norms as JSON.

Run as a subprocess by tests/training/test_sharding.py (the number of simulated CPU devices can
only be chosen before jax is imported):

    python sharded_losses.py DEVICES NAME=DATA,FSDP,TENSOR[,scan] ...

e.g. ``python sharded_losses.py 8 dp=8,1,1 fsdp=1,8,1 tp=1,1,8 dp_fsdp_tp=2,2,2``. A trailing
``,scan`` runs that mesh with ``scan_layers=True, remat_policy='full'``. Every run starts from the
same initial parameters and sees the same batches, so all runs should give the same numbers.

For meshes with fsdp > 1 or tensor > 1 the script checks (and fails loudly otherwise) that the
parameters and the Adam moments are really split over those axes: a comparison that passes
because nothing was sharded would prove nothing.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    _N_DEVICES = int(sys.argv[1])
    if "jax" in sys.modules:
        raise RuntimeError("jax was imported before XLA_FLAGS could be set")
    # Simulated CPU devices. Compiling the train step dominates the run time here; without
    # the CPU fusion emitters and with LLVM optimization level 0 it takes about a quarter as long.
    # Every run (1 device or 8) compiles with the same flags.
    _ours = {"--xla_force_host_platform_device_count": _N_DEVICES, "--xla_backend_optimization_level": 0,
             "--xla_cpu_use_fusion_emitters": "false"}
    _flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if f.split("=")[0] not in _ours]
    os.environ["XLA_FLAGS"] = " ".join([*_flags, *(f"{k}={v}" for k, v in _ours.items())])
    os.environ["JAX_PLATFORMS"] = "cpu"

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from jaxasr.models.whisper import Whisper, WhisperConfig  # noqa: E402
from jaxasr.parallel.mesh import global_batch, make_mesh  # noqa: E402
from jaxasr.training.step import TrainStep  # noqa: E402

STEPS = 5
BATCH = 8  # divisible by every data x fsdp product used
TOKENS = 12
VOCAB = 96  # divisible by 8: the vocabulary really splits over tensor=8
HEADS = 8  # divisible by tensor sizes up to 8
CONFIG = WhisperConfig(
    vocab_size=VOCAB, num_mel_bins=16, d_model=64, encoder_layers=2, decoder_layers=2,
    encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=128, decoder_ffn_dim=128,
    max_source_positions=16, max_target_positions=32,
)
OPTIMIZER = dict(name="adamw", peak_lr=1e-3, weight_decay=0.01, clip_norm=1.0)

# Parameters whose sharding is checked: path -> (dim, logical name) pairs that must be split.
# (Stacked layers have a leading 'layers' dim.)
CHECKED = {
    "decoder/embed_tokens/embedding": {0: "tensor", 1: "fsdp"},  # [vocab, embed]
    "decoder/layers/self_attn/q_proj/kernel": {1: "fsdp", 2: "tensor"},  # [layers, embed, heads, kv]
    "decoder/layers/self_attn/out_proj/kernel": {1: "tensor", 3: "fsdp"},  # [layers, heads, kv, embed]
    "encoder/layers/mlp/fc1/kernel": {1: "fsdp", 2: "tensor"},  # [layers, embed, mlp]
    "encoder/layers/mlp/fc2/kernel": {1: "tensor", 2: "fsdp"},  # [layers, mlp, embed]
}


def path_str(path) -> str:
    out = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        if name not in ("value", "raw_value"):
            out.append(str(name))
    return "/".join(out)


def build_tx(params):
    """The project's optimizer builder when it is importable and works, else plain Optax."""
    try:
        from jaxasr.training.optimizer import build_optimizer

        tx, _ = build_optimizer(OPTIMIZER, params)
        jax.eval_shape(tx.init, params)
        return tx, "jaxasr.training.optimizer.build_optimizer"
    except Exception as e:  # being written concurrently; the fallback is the same rule
        print(f"build_optimizer unavailable ({type(e).__name__}: {e}); using optax", file=sys.stderr)
        tx = optax.chain(optax.clip_by_global_norm(OPTIMIZER["clip_norm"]),
                         optax.adamw(OPTIMIZER["peak_lr"], weight_decay=OPTIMIZER["weight_decay"]))
        return tx, "optax.chain(clip_by_global_norm, adamw)"


def batches():
    rng = np.random.default_rng(1234)
    out = []
    for _ in range(STEPS):
        mask = np.ones((BATCH, TOKENS), np.float32)
        mask[:, -3:] = rng.integers(0, 2, (BATCH, 3))  # some padding, so the token count varies
        out.append({
            "features": rng.standard_normal((BATCH, CONFIG.num_mel_bins, CONFIG.n_audio_frames)).astype(np.float32),
            "decoder_input_ids": rng.integers(0, VOCAB, (BATCH, TOKENS)).astype(np.int32),
            "labels": rng.integers(0, VOCAB, (BATCH, TOKENS)).astype(np.int32),
            "loss_mask": mask,
            "is_text": np.zeros(BATCH, bool),
        })
    return out


def leaves_by_path(tree) -> dict[str, jax.Array]:
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_sharding(step: TrainStep, mesh) -> dict:
    """Specs of the checked parameters; raises if one is not split as the mesh asks."""
    params = leaves_by_path(step.trainable)
    missing = sorted(set(CHECKED) - set(params))
    if missing:
        raise AssertionError(f"checked parameters not found: {missing}; have {sorted(params)[:10]}...")
    report = {}
    for path, dims in CHECKED.items():
        x = params[path]
        spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
        shard_shape = x.addressable_shards[0].data.shape
        report[path] = {"spec": [s if s is None or isinstance(s, str) else list(s) for s in spec],
                        "shape": list(x.shape), "shard_shape": list(shard_shape)}
        for dim, axis in dims.items():
            size = mesh.shape[axis]
            if size == 1:
                continue
            axes = spec[dim] if isinstance(spec[dim], tuple) else (spec[dim],)
            if axis not in axes or shard_shape[dim] != x.shape[dim] // size:
                raise AssertionError(f"{path}: dim {dim} should be split over {axis}={size}; "
                                     f"spec {spec}, shape {x.shape}, shard {shard_shape}")
    # Every kernel and embedding table: replicated only where the mesh gives it nothing to split.
    split_axes = [a for a in ("fsdp", "tensor") if mesh.shape[a] > 1]
    # (By name, not ndim: stacked layer norms and biases are 2-D.)
    replicated = sorted(p for p, x in params.items() if p.rsplit("/", 1)[-1] in ("kernel", "embedding")
                        and all(s is None for s in x.sharding.spec))
    report["replicated_matrices"] = replicated
    if "fsdp" in split_axes and replicated:  # every kernel/embedding has an embed dim
        raise AssertionError(f"fsdp mesh leaves matrices replicated: {replicated}")
    if "tensor" in split_axes:
        bad = [p for p in replicated if "attn" in p or "mlp" in p or "embed_tokens" in p]
        if bad:
            raise AssertionError(f"tensor mesh leaves attention/MLP/embedding matrices replicated: {bad}")
    # The Adam moments are sharded like the parameters.
    fc1 = "encoder/layers/mlp/fc1/kernel"
    moments = [x for p, x in leaves_by_path(step.opt_state).items() if p.endswith(fc1)]
    if not moments:
        raise AssertionError(f"no optimizer state found for {fc1}")
    for m in moments:
        if m.sharding.spec != params[fc1].sharding.spec:
            raise AssertionError(f"optimizer state of {fc1}: {m.sharding.spec} != param {params[fc1].sharding.spec}")
    report["opt_state_" + fc1] = [str(m.sharding.spec) for m in moments]
    return report


def run(shape: tuple[int, int, int], scan: bool, data) -> dict:
    cfg = dataclasses.replace(CONFIG, scan_layers=True, remat_policy="full") if scan else CONFIG
    model = Whisper(cfg, rngs=nnx.Rngs(0))
    if scan:  # same initial parameters as the reference, whatever the init does under scan
        nnx.update(model, nnx.state(Whisper(CONFIG, rngs=nnx.Rngs(0)), nnx.Param))
    tx, tx_name = build_tx(nnx.state(model, nnx.Param))
    mesh = make_mesh(shape)
    t0 = time.perf_counter()
    step = TrainStep.create(model, tx, mesh)
    out = {"mesh": dict(mesh.shape), "scan": scan, "optimizer": tx_name}
    if mesh.shape["fsdp"] > 1 or mesh.shape["tensor"] > 1:
        out["sharding"] = check_sharding(step, mesh)
    t_create = time.perf_counter() - t0
    losses, grad_norms = [], []
    for i, b in enumerate(data):
        m = step(global_batch(b, mesh))
        losses.append(float(m["loss"]))
        grad_norms.append(float(m["grad_norm"]))
        if i == 0:
            t_first = time.perf_counter() - t0
    out.update(losses=losses, grad_norms=grad_norms, seconds={
        "create": round(t_create, 2), "first_step": round(t_first - t_create, 2),
        "total": round(time.perf_counter() - t0, 2)})
    return out


def parse(arg: str) -> tuple[str, tuple[int, int, int], bool]:
    name, _, spec = arg.partition("=")
    parts = spec.split(",")
    scan = parts[-1] == "scan"
    sizes = tuple(int(p) for p in (parts[:-1] if scan else parts))
    if len(sizes) != 3:
        raise SystemExit(f"bad mesh {arg!r}: expected NAME=DATA,FSDP,TENSOR[,scan]")
    return name, sizes, scan


def main(argv: list[str]) -> None:
    n = int(argv[0])
    if jax.device_count() != n:
        raise SystemExit(f"asked for {n} devices, jax sees {jax.device_count()}")
    data = batches()
    results = {}
    for arg in argv[1:]:
        name, shape, scan = parse(arg)
        if math.prod(shape) != n:
            raise SystemExit(f"mesh {shape} does not use all {n} devices")
        results[name] = run(shape, scan, data)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
