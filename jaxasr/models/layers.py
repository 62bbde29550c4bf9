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
        lead, out_shape = x.shape[:x.ndim - self.n_in], kernel.shape[self.n_in:]
        rows = math.prod(lead)
        if rows >= cpu_kernels.MIN_ROWS and cpu_kernels.applies(x, kernel):
            k = math.prod(kernel.shape[:self.n_in])
            y = cpu_kernels.matmul(x.reshape(rows, k), kernel.reshape(k, -1)).reshape(lead + out_shape)
        else:
            y = jax.lax.dot_general(
                x, kernel, ((tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in))), ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


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
        x, table = x.astype(self.dtype), self.embedding[...].astype(self.dtype)
        rows = math.prod(x.shape[:-1])
        if rows >= cpu_kernels.MIN_ROWS and cpu_kernels.applies(x, table):
            return cpu_kernels.matmul(x.reshape(rows, -1), table, True).reshape(x.shape[:-1] + table.shape[:1])
        return jnp.einsum("...d,vd->...v", x, table)
