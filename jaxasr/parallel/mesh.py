"""The device mesh, the one table mapping logical axis names to mesh axes, and shardings from it.

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallel with parameters and optimizer
state sharded on their `embed` dim, gathered per layer by XLA), `tensor` (Megatron-style: heads,
MLP hidden and vocabulary split). A batch is split over `data` x `fsdp`.

Models name their parameter dims (`embed`, `heads`, `mlp`, ...) and their activations
(`activation_batch`, ...); nothing else in the code base names a mesh axis.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.experimental import mesh_utils
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

MeshAxes = str | tuple[str, ...] | None

# logical name -> mesh axes. Every name a model uses must be here (a missing one is an error,
# not silently replicated), so adding a model means deciding how each of its dims is split.
LOGICAL_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("layers", None),  # stacked layers: scanned over, never split
    ("positions", None),
    ("norm", None),
    ("mel", None),
    ("conv_width", None),
    ("conv_in", None),
    ("lora_rank", None),  # LoRA adapters' rank dim: small, replicated
    # activations
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_vocab", "tensor"),
)

log = logging.getLogger(__name__)


def mesh_sizes(shape: Mapping[str, int] | Sequence[int], num_devices: int) -> list[int]:
    """The (data, fsdp, tensor) sizes of `shape` over `num_devices` devices, a -1 resolved."""
    sizes = [int(shape[a]) for a in MESH_AXES] if isinstance(shape, Mapping) else [int(s) for s in shape]
    if len(sizes) != len(MESH_AXES):
        raise ValueError(f"mesh shape {sizes} must give sizes for {MESH_AXES}")
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))}: at most one size may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"there are {num_devices}")
    return sizes


def make_mesh(shape: Mapping[str, int] | Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor); one size may be -1 (all remaining devices)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_sizes(shape, len(devices))
    # create_device_mesh orders devices so that the fastest links carry the innermost axis (tensor).
    device_array = mesh_utils.create_device_mesh(sizes, devices=devices)
    return Mesh(device_array, MESH_AXES)


def logical_to_pspec(names: Sequence[str | None], rules=LOGICAL_RULES) -> P:
    """PartitionSpec for logical dim names; a mesh axis is used at most once (first dim wins)."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in names:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no rule in jaxasr.parallel.mesh.LOGICAL_RULES")
        axes = table[name]
        axes_t = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        axes_t = tuple(a for a in axes_t if a not in used)
        used.update(axes_t)
        out.append(None if not axes_t else axes_t[0] if len(axes_t) == 1 else axes_t)
    return P(*out)


def _fit(spec: P, shape: Sequence[int], mesh: Mesh, where: str) -> P:
    """Drop mesh axes that do not divide a dim (e.g. 51865 vocab over 2), replicating it instead."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes_t = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        size = math.prod(mesh.shape[a] for a in axes_t)
        if axes_t and dim % size:
            log.info("%s: dim %d not divisible by %s=%d, replicated", where, dim, axes_t, size)
            axes_t = ()
        out.append(None if not axes_t else axes_t[0] if len(axes_t) == 1 else axes_t)
    return P(*out)


def state_shardings(state: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """NamedSharding for every array of an `nnx.State` (abstract or concrete), from the logical
    names its variables carry; same tree structure as `state`."""
    specs = jax.tree.leaves(nnx.get_partition_spec(state), is_leaf=lambda x: isinstance(x, P))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    if len(specs) != len(leaves):
        raise ValueError(f"{len(leaves)} arrays but {len(specs)} partition specs")
    out = []
    for (path, value), names in zip(leaves, specs):
        where = jax.tree_util.keystr(path, simple=True, separator="/")
        out.append(NamedSharding(mesh, _fit(logical_to_pspec(tuple(names), rules), value.shape, mesh, where)))
    return jax.tree_util.tree_unflatten(treedef, out)


def opt_state_shardings(tx, opt_state_shapes: Any, param_shardings: Any, mesh: Mesh, params: Any) -> Any:
    """Shardings for an Optax state: every copy of the parameter tree inside it (moments...)
    is sharded like the parameters; leaves shaped otherwise (Adafactor's factored row/column
    moments) and everything else (counts, schedule state) are replicated."""

    def like_param(leaf, sharding, param):
        return sharding if tuple(leaf.shape) == tuple(param.shape) else replicated(mesh)

    return optax.tree_utils.tree_map_params(
        tx,
        like_param,
        opt_state_shapes,
        param_shardings,
        params,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dim over data x fsdp, everything else replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-process batches (this process's rows) -> global arrays split over the batch axes.

    Each process passes only the rows it read; the global batch is their concatenation in
    process order, as `jax.make_array_from_process_local_data` defines it.
    """
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
        for k, v in local.items()
    }


def process_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """Rows this process feeds; the global batch must split evenly over processes and data shards."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch_size % shards:
        raise ValueError(f"batch size {global_batch_size} is not divisible by data x fsdp = {shards}")
    if global_batch_size % jax.process_count():
        raise ValueError(f"batch size {global_batch_size} is not divisible by {jax.process_count()} processes")
    return global_batch_size // jax.process_count()
