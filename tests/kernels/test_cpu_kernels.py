"""The native CPU kernels (jaxasr.kernels.cpu): built here, equal to XLA's ops with their
gradients, used by the layers exactly where they apply, and replaced by XLA's ops when they
cannot be built."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxasr.kernels import cpu as cpu_kernels
from jaxasr.models.layers import Dense, Embed
from tests.subprocesses import start_python


def test_built_on_this_machine():
    # Every other test of the native path would pass through XLA's ops if the build failed.
    assert cpu_kernels.available(), "the native CPU kernels did not build (see the logged warning)"


@pytest.mark.parametrize("trans_b", [False, True])
def test_matmul_and_its_gradients_match_xla(trans_b):
    rng = np.random.default_rng(int(trans_b))
    # 301 rows: row blocks of uneven size over the thread pool
    a = jnp.asarray(rng.standard_normal((301, 70), dtype=np.float32))
    b = jnp.asarray(rng.standard_normal((50, 70) if trans_b else (70, 50), dtype=np.float32))
    weights = jnp.asarray(rng.standard_normal((301, 50), dtype=np.float32))

    def reference(a, b):
        return a @ (b.T if trans_b else b)

    def native(a, b):
        return cpu_kernels.matmul(a, b, trans_b)

    np.testing.assert_allclose(jax.jit(native)(a, b), reference(a, b), rtol=1e-5, atol=1e-5)

    def grads(f):
        return jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.tanh(f(a, b)) * weights), argnums=(0, 1)))(a, b)

    for name, got, expected in zip("ab", grads(native), grads(reference)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")


def _custom_calls(fn, *args) -> int:
    return jax.jit(fn).lower(*args).as_text().count("jaxasr_matmul")


def test_layers_use_the_kernel_where_it_applies():
    dense = Dense((16,), (4, 8), ("embed", "heads", "kv"), rngs=nnx.Rngs(0))  # a multi-dim output
    embed = Embed(100, 16, rngs=nnx.Rngs(0))
    big = jnp.ones((2, cpu_kernels.MIN_ROWS, 16), jnp.float32)
    small = big[:, :cpu_kernels.MIN_ROWS // 4]
    assert _custom_calls(lambda x: dense(x), big) == 1
    assert _custom_calls(lambda x: embed.attend(x), big) == 1
    assert _custom_calls(lambda x: dense(x), small) == 0  # decoding steps: too few rows
    bf16 = Dense((16,), (4, 8), ("embed", "heads", "kv"), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert _custom_calls(lambda x: bf16(x), big) == 0  # float32 compute only
    x = jnp.asarray(np.random.default_rng(2).standard_normal(big.shape, dtype=np.float32))
    kernel = dense.kernel[...]
    np.testing.assert_allclose(dense(x), jnp.einsum("btd,dhk->bthk", x, kernel) + dense.bias[...],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(embed.attend(x), jnp.einsum("btd,vd->btv", x, embed.embedding[...]),
                               rtol=1e-5, atol=1e-5)


_FALLBACK = """
import json, logging
logging.basicConfig()
import jax.numpy as jnp
from flax import nnx
from jaxasr.kernels import cpu
from jaxasr.models.layers import Dense
dense = Dense((8,), (8,), ("embed", "mlp"), rngs=nnx.Rngs(0))
y = dense(jnp.ones((2, cpu.MIN_ROWS, 8)))
print(json.dumps({"available": cpu.available(), "finite": bool(jnp.isfinite(y).all())}))
"""


def test_a_failed_build_falls_back_to_xla(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "/bin/false")  # a compiler that always fails
    monkeypatch.setenv("JAXASR_KERNEL_CACHE", str(tmp_path))
    proc = start_python(["-c", _FALLBACK])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert json.loads(out.splitlines()[-1]) == {"available": False, "finite": True}
    assert "could not be built, using XLA's ops" in err
    assert not list(tmp_path.iterdir())  # no half-written library left behind
