"""Building blocks shared by the models: layers whose parameters carry logical axis names.

Every parameter is created with `out_sharding=<logical names>` metadata and no eager sharding:
the mesh and the rules that map logical names to mesh axes live in `jaxasr.parallel.mesh`, so
a model can be built abstractly (`nnx.eval_shape`) and placed on any mesh afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd

from jaxasr.kernels import cpu as cpu_kernels

Axes = tuple[str | None, ...]


class Buffer(nnx.Variable):
    """A stored, non-trainable tensor (e.g. Whisper's encoder position table).

    It is part of the model state (checkpoints, conversion) but not of `nnx.Param`, so
    optimizers built with `wrt=nnx.Param` never update it, as in the reference implementation.
    """


def make_param(key: jax.Array, init, shape: Sequence[int], axes: Axes, dtype) -> nnx.Param:
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {tuple(shape)}")
    return nnx.Param(init(key, tuple(shape), dtype), out_sharding=axes, eager_sharding=False)


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op without a mesh and rules."""
    rules = spmd.get_logical_axis_rules()
    if not rules or jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, spmd.get_pspec(axes, rules))


class Dense(nnx.Module):
    """y = x @ W + b, where W may have several input or output dims (e.g. heads x head_dim).

    `in_shape`/`out_shape` are the kernel's leading/trailing dims; x's last `len(in_shape)` dims
    are contracted.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        axes: Axes,
        *,
        use_bias: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        fan_in = 1
        for d in in_shape:
            fan_in *= d
        init = nnx.initializers.normal(stddev=fan_in**-0.5)
        self.kernel = make_param(rngs.params(), init, in_shape + out_shape, axes, param_dtype)
        self.bias = (
            make_param(rngs.params(), nnx.initializers.zeros, out_shape, axes[len(in_shape):], param_dtype)
            if use_bias
            else None
        )
        self.n_in = len(in_shape)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        x = x.astype(self.dtype)
        if _native(x, kernel, self.n_in):
            y = _native_matmul(x, [kernel], self.n_in)[0]
        else:
            y = jax.lax.dot_general(
                x, kernel, ((tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in))), ((), ())))
        return self._add_bias(y)

    def _add_bias(self, y: jax.Array) -> jax.Array:
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


def _native(x: jax.Array, kernel: jax.Array, n_in: int) -> bool:
    """Whether x @ kernel goes to the native CPU matmul: only large ones (see MIN_ROWS)."""
    return cpu_kernels.applies(x, kernel) and math.prod(x.shape[:x.ndim - n_in]) >= cpu_kernels.min_rows()


def _native_matmul(x: jax.Array, kernels: list[jax.Array], n_in: int) -> list[jax.Array]:
    """x times each kernel, as one native matmul over the kernels side by side."""
    lead, k = x.shape[:x.ndim - n_in], math.prod(x.shape[x.ndim - n_in:])
    flat = [w.reshape(k, -1) for w in kernels]
    y = cpu_kernels.matmul(x.reshape(-1, k), jnp.concatenate(flat, axis=1))
    parts = jnp.split(y, np.cumsum([w.shape[1] for w in flat])[:-1], axis=1)
    return [part.reshape(lead + w.shape[n_in:]) for part, w in zip(parts, kernels)]


def dense_together(layers: Sequence[Dense], x: jax.Array) -> list[jax.Array]:
    """The outputs of several Dense layers on the same x. On the native CPU path, when all are
    plain `Dense` (a LoRA-wrapped one adds its own term), as one matmul over their kernels side
    by side: whisper's [24000, 384] x [384, 384] projections ran at 100-130 GFLOP/s, a wider
    [384, 1536] kernel at 200-230. Elsewhere one call each (on a mesh, concatenating kernels
    sharded over one axis would move them between devices)."""
    first = layers[0]
    kernels = [layer.kernel[...].astype(first.dtype) for layer in layers]
    x = x.astype(first.dtype)
    if (len(layers) == 1 or any(type(layer) is not Dense or layer.n_in != first.n_in or layer.dtype != first.dtype
                                for layer in layers) or not _native(x, kernels[0], first.n_in)):
        return [layer(x) for layer in layers]
    return [layer._add_bias(y) for layer, y in zip(layers, _native_matmul(x, kernels, first.n_in))]


def dense_gelu(layer: Dense, x: jax.Array) -> jax.Array:
    """gelu(layer(x)) with the exact GELU; on the native CPU path one kernel that adds the bias and
    applies the GELU to the product block by block (`cpu_kernels.dense_gelu`)."""
    kernel = layer.kernel[...].astype(layer.dtype)
    x = x.astype(layer.dtype)
    plain = type(layer) is Dense and layer.n_in == 1 and kernel.ndim == 2 and layer.bias is not None
    if plain and _native(x, kernel, 1):
        y = cpu_kernels.dense_gelu(x.reshape(-1, x.shape[-1]), kernel, layer.bias[...].astype(layer.dtype))
        return y.reshape(x.shape[:-1] + kernel.shape[1:])
    return jax.nn.gelu(layer(x), approximate=False)


def dense_heads_together(layers: Sequence[Dense], x: jax.Array) -> list[jax.Array]:
    """Outputs of Dense layers [d] -> [heads, head_dim] on x [batch, length, d], each head-major
    [batch, heads, length, head_dim] (as decoding reads attention keys/values). On the native CPU
    path one matmul writes them so, bias included (`cpu_kernels.matmul_heads`); elsewhere
    `dense_together` and a transpose."""
    first = layers[0]
    head_shape = first.kernel.shape[1:]
    if (x.ndim == 3 and len(head_shape) == 2 and all(type(layer) is Dense and layer.kernel.shape == first.kernel.shape
                                                      and layer.dtype == first.dtype for layer in layers)):
        kernels = [layer.kernel[...].astype(first.dtype) for layer in layers]
        x = x.astype(first.dtype)
        if _native(x, kernels[0], 1):
            width = math.prod(head_shape)
            bias = jnp.concatenate([jnp.zeros((width,), first.dtype) if layer.bias is None
                                    else layer.bias[...].astype(first.dtype).reshape(-1) for layer in layers])
            kernel = jnp.concatenate([w.reshape(w.shape[0], -1) for w in kernels], axis=1)
            return list(cpu_kernels.matmul_heads(x.reshape(-1, x.shape[-1]), kernel, bias, x.shape[0], head_shape))
    return [y.transpose(0, 2, 1, 3) for y in dense_together(layers, x)]


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32 (as PyTorch does for fp32 and autocast), cast back to `dtype`."""

    def __init__(self, dim: int, *, eps: float = 1e-5, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        del rngs  # deterministic init; the argument keeps the constructor uniform
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",), eager_sharding=False)
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("norm",), eager_sharding=False)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class Conv1d(nnx.Module):
    """1-D convolution over [batch, time, channels] with 'SAME'-style symmetric padding."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
                 axes: Axes, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        init = nnx.initializers.normal(stddev=(in_ch * kernel_size) ** -0.5)
        self.kernel = make_param(rngs.params(), init, (kernel_size, in_ch, out_ch), axes, param_dtype)
        self.bias = make_param(rngs.params(), nnx.initializers.zeros, (out_ch,), axes[-1:], param_dtype)
        self.stride, self.padding, self.dtype = stride, padding, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            window_strides=(self.stride,),
            padding=((self.padding, self.padding),),
            dimension_numbers=("NWC", "WIO", "NWC"),
        )
        return y + self.bias[...].astype(self.dtype)


class Embed(nnx.Module):
    """Token embedding table [vocab, embed]; `attend` gives tied output logits."""

    def __init__(self, num: int, dim: int, *, axes: Axes = ("vocab", "embed"), dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.embedding = make_param(rngs.params(), nnx.initializers.normal(stddev=0.02), (num, dim), axes,
                                    param_dtype)
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        table = self.embedding[...].astype(self.dtype)
        x = x.astype(self.dtype)
        # Natively on MKL's sgemm only: OpenBLAS's was slower than XLA's here (143 vs 106 ms).
        if cpu_kernels.blas() == "mkl" and _native(x, table, 1):
            return cpu_kernels.matmul_nt(x.reshape(-1, x.shape[-1]), table).reshape(*x.shape[:-1], -1)
        return jnp.einsum("...d,vd->...v", x, table)
