"""The CPU attention kernels equal `jax.nn.dot_product_attention`, values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxasr.models import cpu_attention


@pytest.mark.parametrize("kernel", [cpu_attention.per_head_attention, cpu_attention.blocked_attention])
# 800: a short last query block (padded in blocked_attention); 3 heads: one head per step in
# per_head_attention, 4 heads: two per step
@pytest.mark.parametrize("length, batch, heads", [(800, 1, 3), (1500, 2, 3), (800, 2, 4)])
def test_kernels_match_xla(kernel, length, batch, heads):
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
