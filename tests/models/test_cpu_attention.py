"""The CPU attention kernels equal `jax.nn.dot_product_attention`, values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxasr.models import cpu_attention


@pytest.mark.parametrize("kernel, each_blas", [
    (cpu_attention.per_head_attention, None), (cpu_attention.blocked_attention, None),
    (cpu_attention.native_attention, "openblas"), (cpu_attention.native_attention, "mkl"),
], indirect=["each_blas"])
# 800: a short last query block (padded in blocked_attention); 3 heads: one head per step in
# per_head_attention, 4 heads: two per step; native_attention: 256 queries a block, 800 = 3 x 256 + 32
@pytest.mark.parametrize("length, batch, heads", [(800, 1, 3), (1500, 2, 3), (800, 2, 4)])
def test_kernels_match_xla(kernel, each_blas, length, batch, heads):
    rng = np.random.default_rng(length + heads)
    q, k, v = (jnp.asarray(rng.standard_normal((batch, length, heads, 16), dtype=np.float32)) for _ in range(3))
    scale = 16 ** -0.5
    reference = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")  # noqa: E731
    ours = lambda q, k, v: kernel(q, k, v, scale)  # noqa: E731
    np.testing.assert_allclose(jax.jit(ours)(q, k, v), reference(q, k, v), atol=2e-6)
    weights = jnp.asarray(rng.standard_normal(q.shape, dtype=np.float32))  # a loss with distinct per-output weights

    def grads(f):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)) * weights), argnums=(0, 1, 2)))(q, k, v)

    for name, got, expected in zip("qkv", grads(ours), grads(reference)):
        np.testing.assert_allclose(got, expected, atol=2e-5, err_msg=f"d{name}")


def test_per_head_keeps_the_input_dtype():
    q = jnp.ones((1, 400, 2, 8), jnp.bfloat16)
    assert cpu_attention.per_head_attention(q, q, q, 0.5).dtype == jnp.bfloat16


def test_native_attention_with_fewer_keys_and_nan():
    """Fewer keys than queries (values and gradients), and a NaN in a query reaches its output row only."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 300, 2, 8), dtype=np.float32))
    k, v = (jnp.asarray(rng.standard_normal((2, 70, 2, 8), dtype=np.float32)) for _ in range(2))
    expected = jax.nn.dot_product_attention(q, k, v, scale=0.3, implementation="xla")
    np.testing.assert_allclose(cpu_attention.native_attention(q, k, v, 0.3), expected, atol=2e-6)
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))  # noqa: E731
    native = jax.grad(loss(lambda q, k, v: cpu_attention.native_attention(q, k, v, 0.3)), argnums=(0, 1, 2))
    xla = jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=0.3)), argnums=(0, 1, 2))
    for name, got, want in zip("qkv", native(q, k, v), xla(q, k, v)):
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=f"d{name}")
    out = np.asarray(cpu_attention.native_attention(q.at[1, 5, 0, 3].set(jnp.nan), k, v, 0.3))
    assert np.isnan(out[1, 5, 0]).all() and not np.isnan(np.delete(out[1], 5, axis=0)).any()
