"""The native CPU kernels (jaxasr.kernels.cpu): built here, equal to XLA's ops with their
gradients, used by the layers exactly where they apply, and replaced by XLA's ops when they
cannot be built."""

from __future__ import annotations

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxasr.kernels import cpu as cpu_kernels
from jaxasr.models.layers import Dense, dense_gelu, dense_heads_together, dense_together
from tests.custom_calls import custom_calls
from tests.subprocesses import start_python


def test_built_on_this_machine():
    # Every other test of the native path would pass through XLA's ops if the build failed.
    assert cpu_kernels.available(), "the native CPU kernels did not build (see the logged warning)"
    # MKL's sgemm by default wherever the mkl extra is installed (JAXASR_BLAS unset here).
    assert cpu_kernels.blas() == ("mkl" if cpu_kernels.mkl_library() else "openblas")


def test_matmul_and_its_gradients_match_xla(each_blas):
    rng = np.random.default_rng(0)
    # 301 x 50: row blocks of uneven size; 20 x 300: blocks of columns (C wider than tall)
    for m, k, n in [(301, 70, 50), (20, 33, 300)]:
        a, b = (jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for s in [(m, k), (k, n)])
        weights = jnp.asarray(rng.standard_normal((m, n), dtype=np.float32))
        np.testing.assert_allclose(jax.jit(cpu_kernels.matmul)(a, b), a @ b, rtol=1e-5, atol=1e-5)

        def grads(f, weights=weights, a=a, b=b):
            return jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.tanh(f(a, b)) * weights), argnums=(0, 1)))(a, b)

        # db sums 301 products whose tanh' factor depends on the forward's rounding: two correct
        # float32 summation orders (OpenBLAS's Zen kernels vs XLA's) differed by 1.7e-5 on an AMD EPYC.
        for name, got, expected in zip("ab", grads(cpu_kernels.matmul), grads(jnp.matmul)):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=5e-5, err_msg=f"d{name}")


def test_tied_output_projection_reads_the_table_in_place(each_blas):
    """Embed.attend: x @ table^T as `matmul_nt` on MKL (values and both gradients equal XLA's
    einsum), XLA's einsum on OpenBLAS."""
    from jaxasr.models.layers import Embed

    rng = np.random.default_rng(5)
    embed = Embed(1000, 24, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((2, cpu_kernels.min_rows() + 13, 24), dtype=np.float32))
    weights = jnp.asarray(rng.standard_normal(x.shape[:2] + (1000,), dtype=np.float32))
    table = embed.embedding[...]

    def attend(x, table):  # Embed.attend with the table as an argument, to differentiate
        return Embed.attend(SimpleNamespace(embedding=table, dtype=jnp.float32), x)

    assert custom_calls(attend, x, table) == (1 if each_blas == "mkl" else 0)
    reference = lambda x, table: jnp.einsum("btd,vd->btv", x, table)  # noqa: E731
    np.testing.assert_allclose(jax.jit(attend)(x, table), reference(x, table), rtol=1e-5, atol=1e-5)

    def grads(f):
        return jax.jit(jax.grad(lambda x, t: jnp.sum(jnp.tanh(f(x, t)) * weights), argnums=(0, 1)))(x, table)

    for name, got, expected in zip(["x", "table"], grads(attend), grads(reference)):
        # the table's gradient sums over ~550 rows: float32 rounding ~1e-5 of its largest entries
        atol = 1e-5 * float(jnp.abs(expected).max())
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=atol, err_msg=f"d{name}")


def test_product_reads_transposes_in_place(each_blas):
    """op(a) @ op(b) for every transpose combination, on the three ways the kernel splits work:
    row blocks, column blocks, and the contraction (a small product of long operands, as weight
    gradients are: there one partial product per thread, summed)."""
    rng = np.random.default_rng(1)
    for m, k, n in [(301, 70, 50), (20, 33, 300), (24, 1001, 40)]:
        a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
        for trans_a in (False, True):
            for trans_b in (False, True):
                got = jax.jit(lambda x, y, ta=trans_a, tb=trans_b: cpu_kernels.product(x, y, trans_a=ta, trans_b=tb))(
                    jnp.asarray(a.T.copy() if trans_a else a), jnp.asarray(b.T.copy() if trans_b else b))
                np.testing.assert_allclose(got, a @ b, rtol=1e-4, atol=1e-4, err_msg=f"{m, k, n, trans_a, trans_b}")


def test_dense_heads_together_writes_head_major_with_bias_and_gradients():
    """Key/value-like layers (with and without bias) as one native matmul whose results come out
    head-major: values and gradients against XLA's einsum, for one sequence (split into row
    chunks for the threads) and for several."""
    rng = np.random.default_rng(3)
    layers = [Dense((32,), (4, 8), ("embed", "heads", "kv"), use_bias=i % 2 == 1, rngs=nnx.Rngs(i)) for i in range(4)]
    for layer in layers[1::2]:
        layer.bias[...] = jnp.asarray(rng.standard_normal(layer.bias.shape, dtype=np.float32))

    def reference(layers, x):
        return [jnp.einsum("btd,dhk->bhtk", x, layer.kernel[...])
                + (0 if layer.bias is None else layer.bias[...][None, :, None, :]) for layer in layers]

    for batch in (1, 3):
        x = jnp.asarray(rng.standard_normal((batch, cpu_kernels.min_rows() + 77, 32), dtype=np.float32))
        assert custom_calls(lambda x: dense_heads_together(layers, x), x, name="jaxasr_matmul_heads") == 1
        for got, expected in zip(dense_heads_together(layers, x), reference(layers, x)):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        weights = [jnp.asarray(rng.standard_normal(y.shape, dtype=np.float32)) for y in reference(layers, x)]

        def grads(f):
            loss = lambda layers, x: sum(jnp.sum(jnp.tanh(y) * w) for y, w in zip(f(layers, x), weights))  # noqa: E731
            return jax.tree.leaves(nnx.grad(loss, argnums=(0, 1))(layers, x))

        for got, expected in zip(grads(dense_heads_together), grads(reference)):
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_dense_gelu_matches_xla_with_gradients():
    """fc1 + exact GELU as one native kernel: values and gradients against jax.nn.gelu over the
    layer (a partial last block of rows included)."""
    rng = np.random.default_rng(4)
    layer = Dense((48,), (200,), ("embed", "mlp"), rngs=nnx.Rngs(0))
    layer.bias[...] = jnp.asarray(rng.standard_normal(200, dtype=np.float32))
    x = jnp.asarray(2 * rng.standard_normal((2, cpu_kernels.min_rows() + 77, 48), dtype=np.float32))
    assert custom_calls(lambda x: dense_gelu(layer, x), x, name="jaxasr_dense_gelu") == 1

    def reference(layer, x):
        return jax.nn.gelu(jnp.einsum("btd,df->btf", x, layer.kernel[...]) + layer.bias[...], approximate=False)

    np.testing.assert_allclose(dense_gelu(layer, x), reference(layer, x), rtol=1e-5, atol=1e-5)
    weights = jnp.asarray(rng.standard_normal((2, cpu_kernels.min_rows() + 77, 200), dtype=np.float32))

    def grads(f):
        return jax.tree.leaves(nnx.grad(lambda layer, x: jnp.sum(f(layer, x) * weights), argnums=(0, 1))(layer, x))

    for got, expected in zip(grads(dense_gelu), grads(reference)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)


def test_eigh_matches_jax_on_batches_and_under_vmap():
    """Batched symmetric eigendecomposition (TSV-M's per-task Gram matrices): eigenvalues as
    jnp.linalg.eigh's, eigenvectors orthonormal and reconstructing the input, any leading batch
    dims, vmapped (the merge driver vmaps over weights), and of a Gram matrix it forms itself."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 40, 40), dtype=np.float32)
    gram = jnp.asarray(x @ np.swapaxes(x, -1, -2))
    results = [cpu_kernels.eigh(gram), jax.jit(jax.vmap(cpu_kernels.eigh))(gram),
               cpu_kernels.eigh(jnp.asarray(np.swapaxes(x, -1, -2)), gram=True)]  # x x^T from its transpose
    for w, v in results:
        assert w.shape == (2, 3, 40) and v.shape == (2, 3, 40, 40)
        np.testing.assert_allclose(w, jnp.linalg.eigh(gram)[0], rtol=1e-4, atol=1e-3)
        assert (np.diff(np.asarray(w), axis=-1) >= 0).all()  # ascending
        np.testing.assert_allclose(v @ jnp.swapaxes(v, -1, -2), np.broadcast_to(np.eye(40), v.shape), atol=1e-5)
        np.testing.assert_allclose((v * w[..., None, :]) @ jnp.swapaxes(v, -1, -2), gram, rtol=1e-4, atol=1e-3)


def test_polar_matches_the_svd_route_on_every_path():
    """Polar factors against float64 SVD: square (SVD), long with orthonormal blocks (Gram route),
    wide, and a long rank-deficient one (fails the Gram test, so the SVD), vmapped too."""
    rng = np.random.default_rng(6)

    def blocks(m, k, t):  # TSV-M's concatenated per-task bases
        return np.concatenate([np.linalg.qr(rng.standard_normal((m, k)))[0] for _ in range(t)], axis=1)

    def reference(a):
        u, _, vt = np.linalg.svd(a.astype(np.float64), full_matrices=False)
        return u @ vt

    cases = [np.stack([blocks(64, 16, 4) for _ in range(3)]), np.stack([blocks(160, 16, 4) for _ in range(3)]),
             np.stack([blocks(160, 16, 4).T for _ in range(2)])]
    for a in cases:
        a = a.astype(np.float32)
        for got in (cpu_kernels.polar(jnp.asarray(a)), jax.jit(jax.vmap(cpu_kernels.polar))(jnp.asarray(a))):
            np.testing.assert_allclose(got, np.stack([reference(x) for x in a]), atol=2e-5)
    # rank 16 of 32 columns: no unique polar factor, but its columns stay orthonormal on the rank's span
    deficient = np.concatenate([blocks(100, 16, 1)] * 2, axis=1).astype(np.float32)[None]
    got = np.asarray(cpu_kernels.polar(jnp.asarray(deficient)))[0]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got @ got.T @ deficient[0], deficient[0], atol=1e-4)


def test_layers_use_the_kernel_where_it_applies():
    dense = Dense((16,), (4, 8), ("embed", "heads", "kv"), rngs=nnx.Rngs(0))  # a multi-dim output
    big = jnp.ones((2, cpu_kernels.min_rows(), 16), jnp.float32)
    small = big[:, :cpu_kernels.min_rows() // 4]
    assert custom_calls(lambda x: dense(x), big) == 1
    assert custom_calls(lambda x: dense(x), small) == 0  # decoding steps: too few rows
    bf16 = Dense((16,), (4, 8), ("embed", "heads", "kv"), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert custom_calls(lambda x: bf16(x), big) == 0  # float32 compute only
    x = jnp.asarray(np.random.default_rng(2).standard_normal(big.shape, dtype=np.float32))
    kernel = dense.kernel[...]
    np.testing.assert_allclose(dense(x), jnp.einsum("btd,dhk->bthk", x, kernel) + dense.bias[...],
                               rtol=1e-5, atol=1e-5)


_DENSE_LAYER_IN_A_FRESH_PROCESS = """
import json, logging
logging.basicConfig()
import jax.numpy as jnp
from flax import nnx
from jaxasr.kernels import cpu
from jaxasr.models.layers import Dense
dense = Dense((8,), (8,), ("embed", "mlp"), rngs=nnx.Rngs(0))
y = dense(jnp.ones((2, cpu.min_rows(), 8)))
print(json.dumps({"available": cpu.available(), "finite": bool(jnp.isfinite(y).all()), "blas": cpu.blas()}))
"""


def test_builds_from_scratch(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXASR_KERNEL_CACHE", str(tmp_path))  # an empty cache: a fresh machine
    monkeypatch.setenv("JAXASR_BLAS", "openblas")  # the switch away from MKL's default
    proc = start_python(["-c", _DENSE_LAYER_IN_A_FRESH_PROCESS])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert json.loads(out.splitlines()[-1]) == {"available": True, "finite": True, "blas": "openblas"}
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]  # the library, no leftovers


def test_a_misspelled_blas_is_named_and_openblas_kept(monkeypatch):
    monkeypatch.setenv("JAXASR_BLAS", "mkll")
    proc = start_python(["-c", _DENSE_LAYER_IN_A_FRESH_PROCESS])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert json.loads(out.splitlines()[-1])["blas"] == "openblas"
    assert "JAXASR_BLAS='mkll' is not one of ('mkl', 'openblas')" in err


def test_a_failed_build_falls_back_to_xla(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "/bin/false")  # a compiler that always fails
    monkeypatch.setenv("JAXASR_KERNEL_CACHE", str(tmp_path))
    proc = start_python(["-c", _DENSE_LAYER_IN_A_FRESH_PROCESS])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert json.loads(out.splitlines()[-1]) == {"available": False, "finite": True, "blas": "none"}
    assert "could not be built, using XLA's ops" in err
    assert not list(tmp_path.iterdir())  # no half-written library left behind


def test_dense_together_is_one_matmul_of_plain_layers_only():
    rngs = nnx.Rngs(1)
    q = Dense((16,), (2, 8), ("embed", "heads", "kv"), rngs=rngs)
    k = Dense((16,), (2, 8), ("embed", "heads", "kv"), use_bias=False, rngs=rngs)
    mlp = Dense((16,), (24,), ("embed", "mlp"), rngs=rngs)

    class Shifted(Dense):  # stands for a LoRA-wrapped layer: its own __call__ must run
        def __call__(self, x):
            return super().__call__(x) + 1.0

    shifted = Shifted((16,), (24,), ("embed", "mlp"), rngs=rngs)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, cpu_kernels.min_rows(), 16), dtype=np.float32))
    for layers, calls in [([q, k, mlp], 1), ([q, k, shifted], 3)]:
        assert custom_calls(lambda x: dense_together(layers, x), x) == calls
        for got, layer in zip(dense_together(layers, x), layers):
            np.testing.assert_allclose(got, layer(x), rtol=1e-6, atol=1e-6)
    small = x[:, :8]  # below min_rows(): XLA, one dot each
    assert custom_calls(lambda x: dense_together([q, k], x), small) == 0


def test_attention_rejects_mismatched_shapes():
    q = jnp.ones((1, 4, 2, 8), jnp.float32)
    k = jnp.ones((1, 4, 3, 8), jnp.float32)  # three heads against q's two
    with pytest.raises(Exception, match=r"k and v \[B, S, H, D\]"):
        jax.block_until_ready(cpu_kernels.attention(q, k, k))
