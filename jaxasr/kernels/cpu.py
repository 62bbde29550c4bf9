"""Native float32 kernels for XLA:CPU through `jax.ffi`: BLAS matmuls, attention, batched LAPACK.

Why: on this project's CPU, XLA:CPU's fp32 matmuls run at about half the speed of OpenBLAS's
sgemm on the models' shapes (tools/bench_transcribe.py, tools/bench_train.py), and XLA cannot
fuse attention's two matmuls with the softmax between them. `cpu_kernels.cc` is compiled on first
use with the system C++ compiler against jaxlib's FFI headers and scipy-openblas32 (a PyPI
OpenBLAS made to be built against), for this machine's CPU, and cached. The models call the
kernels only where they apply (`applies`): float32, the CPU backend, a single device (they carry
no sharding rule). Anywhere else, or when the build fails (a warning says why), XLA's own ops run.
`JAXASR_CPU_KERNELS=0` turns them off.

The sgemm under every kernel is MKL's (sequential) when the `mkl` wheel is installed (the `mkl`
extra; `make setup` installs it on x86-64 Linux), else OpenBLAS's: MKL's ran 1.07-1.33x
OpenBLAS's per core on the models' shapes here (AVX-512 Xeon). `JAXASR_BLAS=openblas` keeps
OpenBLAS; `use_blas` switches at run time: compiled programs run the new sgemm on their next
call, but which matmuls go native (`min_rows`, the tied output projection) was fixed when they
were traced.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxasr.kernels.build import load_library

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
# Matmuls of fewer rows (decoding; on OpenBLAS also the decoder's training batch) stay with XLA,
# which was as fast or faster there: e.g. [512, 384] x [384, 1536] in 2.3-2.6 ms vs 2.7-3.7 on
# OpenBLAS. MKL's sgemm was 1.0-1.4x XLA's from 256 rows up (whisper tiny's decoder shapes).
MIN_ROWS = {"mkl": 256, "openblas": 1024}


def _build_args() -> tuple[list[str], list[str]]:
    import scipy_openblas32 as openblas

    args = [f"-I{jax.ffi.include_dir()}", f"-I{openblas.get_include_dir()}", f"-L{openblas.get_lib_dir()}",
            f"-l{openblas.get_library()}", f"-Wl,-rpath,{openblas.get_lib_dir()}", "-ldl"]
    return args, [metadata.version("jaxlib"), metadata.version("scipy-openblas32")]


@functools.cache
def mkl_library() -> Path | None:
    """MKL's runtime library from the `mkl` wheel, when installed."""
    try:
        files = metadata.files("mkl") or []
    except metadata.PackageNotFoundError:
        return None
    found = sorted(f for f in files if f.name.startswith("libmkl_rt.so"))
    return Path(found[-1].locate()).resolve() if found else None


BLAS_NAMES = ("mkl", "openblas")


def blas() -> str:
    """The BLAS the kernels' sgemm runs now: "mkl" or "openblas" ("none" without the kernels)."""
    if not available():
        return "none"
    return "mkl" if _handle.JaxasrUsingMkl() else "openblas"


def min_rows() -> int:
    """The fewest rows a matmul needs to go to the native kernels (on the BLAS in use)."""
    return MIN_ROWS.get(blas(), MIN_ROWS["openblas"])


def use_blas(name: str) -> str:
    """Route the kernels' sgemm to `name` ("mkl" or "openblas"); returns the previous choice.
    Raises when MKL is asked for and cannot be loaded."""
    _require()
    previous = blas()
    _switch_blas(_handle, name)
    return previous


def _switch_blas(lib: ctypes.CDLL, name: str) -> None:
    if name == "openblas":
        lib.JaxasrUseMkl(None)
    elif name == "mkl":
        path = mkl_library()
        if path is None or not lib.JaxasrUseMkl(str(path).encode()):
            raise RuntimeError(f"MKL could not be loaded ({path or 'the mkl wheel is not installed'})")
    else:
        raise ValueError(f"unknown BLAS {name!r}: expected one of {BLAS_NAMES}")


_handle: ctypes.CDLL | None = None  # the loaded kernels, once `available()` has built them


@functools.cache
def available() -> bool:
    """Build (once per machine, then cached) and register the kernels; False, with a warning
    saying why, when that is not possible here."""
    lib = load_library(SOURCE, what="jaxasr CPU kernels", switch="JAXASR_CPU_KERNELS", fallback="XLA's ops",
                       build_args=_build_args)
    if lib is None:
        return False
    lib.JaxasrSingleThreadedBlas()
    lib.JaxasrUseMkl.argtypes = [ctypes.c_char_p]
    wanted = os.environ.get("JAXASR_BLAS", "mkl")
    if wanted not in BLAS_NAMES:
        log.warning("JAXASR_BLAS=%r is not one of %s; the kernels use OpenBLAS", wanted, BLAS_NAMES)
    elif wanted == "mkl" and mkl_library() is not None:
        try:
            _switch_blas(lib, "mkl")
        except RuntimeError as e:
            log.warning("jaxasr CPU kernels: %s; using OpenBLAS", e)
    global _handle
    _handle = lib
    jax.ffi.register_ffi_target("jaxasr_matmul", jax.ffi.pycapsule(lib.JaxasrMatmul), platform="cpu")
    jax.ffi.register_ffi_target("jaxasr_matmul_heads", jax.ffi.pycapsule(lib.JaxasrMatmulHeads), platform="cpu")
    jax.ffi.register_ffi_target("jaxasr_dense_gelu", jax.ffi.pycapsule(lib.JaxasrDenseGelu), platform="cpu")
    jax.ffi.register_ffi_target("jaxasr_gelu_grad", jax.ffi.pycapsule(lib.JaxasrGeluGrad), platform="cpu")
    jax.ffi.register_ffi_target("jaxasr_cross_entropy", jax.ffi.pycapsule(lib.JaxasrCrossEntropy), platform="cpu")
    jax.ffi.register_ffi_target("jaxasr_cross_entropy_grad", jax.ffi.pycapsule(lib.JaxasrCrossEntropyGrad),
                                platform="cpu")
    jax.ffi.register_ffi_target("jaxasr_eigh", jax.ffi.pycapsule(lib.JaxasrEigh), platform="cpu")
    jax.ffi.register_ffi_target("jaxasr_polar", jax.ffi.pycapsule(lib.JaxasrPolar), platform="cpu")
    jax.ffi.register_ffi_target("jaxasr_attention", jax.ffi.pycapsule(lib.JaxasrAttention), platform="cpu")
    jax.ffi.register_ffi_target("jaxasr_attention_backward", jax.ffi.pycapsule(lib.JaxasrAttentionBackward),
                                platform="cpu")
    return True


def applies(*arrays) -> bool:
    """Whether the native kernels can take these operands: float32 on a lone CPU device."""
    return (all(x.dtype == jnp.float32 for x in arrays) and jax.default_backend() == "cpu"
            and jax.device_count() == 1 and available())


def _require():
    if not available():
        raise RuntimeError("jaxasr's native CPU kernels are not available here (see the warning above, "
                           "or JAXASR_CPU_KERNELS=0); check `applies` before calling them")


def product(a, b, *, trans_a: bool = False, trans_b: bool = False):
    """op(a) @ op(b) for float32 matrices with the native kernel, op transposing where asked (the
    transposes are read in place, never copied). Not differentiable: see `matmul`."""
    _require()
    m, n = a.shape[1 if trans_a else 0], b.shape[0 if trans_b else 1]
    call = jax.ffi.ffi_call("jaxasr_matmul", jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential")
    return call(a, b, trans_a=trans_a, trans_b=trans_b)


@jax.custom_vjp
def matmul(a, b):
    """a [M, K] @ b [K, N] in float32 with the native kernel, differentiable: the gradients are
    native products too, g b^T and a^T g, the latter split over its long contraction."""
    return product(a, b)


def _matmul_fwd(a, b):
    return matmul(a, b), (a, b)


def _matmul_bwd(residuals, g):
    a, b = residuals
    return product(g, b, trans_b=True), product(a, g, trans_a=True)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


@jax.custom_vjp
def matmul_nt(a, b):
    """a [M, K] @ b[N, K]^T with b read in place (a tied output projection against its embedding
    table), differentiable: g b and g^T a, neither transpose copied (XLA writes a transposed
    [N, M] copy of g for the table's gradient)."""
    return product(a, b, trans_b=True)


def _matmul_nt_fwd(a, b):
    return matmul_nt(a, b), (a, b)


def _matmul_nt_bwd(residuals, g):
    a, b = residuals
    return product(g, b), product(g, a, trans_a=True)


matmul_nt.defvjp(_matmul_nt_fwd, _matmul_nt_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def matmul_heads(a, b, bias, batch: int, head_shape: tuple[int, int]):
    """a [M, K] @ b [K, N] + bias [N] as head-major arrays [batch, heads, M / batch, head_dim], one
    per head_shape-sized group of b's columns (kernels side by side): each sequence's rows are
    multiplied in cache and written out a head at a time, where XLA transposed the whole product
    afterwards (eight [16, 1500, 6, 64] transposes took 0.3 s of a tiny.en decoding batch).
    Differentiable."""
    _require()
    heads, dim = head_shape
    shape = jax.ShapeDtypeStruct((batch, heads, a.shape[0] // batch, dim), jnp.float32)
    groups = b.shape[1] // (heads * dim)
    return tuple(jax.ffi.ffi_call("jaxasr_matmul_heads", (shape,) * groups, vmap_method="sequential")(a, b, bias))


def _matmul_heads_fwd(a, b, bias, batch, head_shape):
    return matmul_heads(a, b, bias, batch, head_shape), (a, b)


def _matmul_heads_bwd(batch, head_shape, residuals, d_outs):
    a, b = residuals
    # back to the [M, N] layout of the product
    d_y = jnp.concatenate([d.transpose(0, 2, 1, 3).reshape(a.shape[0], -1) for d in d_outs], axis=1)
    return product(d_y, b, trans_b=True), product(a, d_y, trans_a=True), jnp.sum(d_y, axis=0)


matmul_heads.defvjp(_matmul_heads_fwd, _matmul_heads_bwd)


def _dense_gelu_call(a, b, bias, keep_pre: bool):
    _require()
    shape = jax.ShapeDtypeStruct((a.shape[0], b.shape[1]), jnp.float32)
    call = jax.ffi.ffi_call("jaxasr_dense_gelu", (shape,) * (2 if keep_pre else 1), vmap_method="sequential")
    return call(a, b, bias)


@jax.custom_vjp
def dense_gelu(a, b, bias):
    """gelu(a [M, K] @ b [K, N] + bias [N]), exact (erf) GELU, with the shift and the activation
    done on each block of the product while it is in cache (XLA's separate bias + GELU pass took
    ~45 ms per tiny.en encoder layer at batch 16). Differentiable: the forward of a gradient
    keeps the pre-activation."""
    return _dense_gelu_call(a, b, bias, False)[0]


def _dense_gelu_fwd(a, b, bias):
    y, pre = _dense_gelu_call(a, b, bias, True)
    return y, (a, b, pre)


def _dense_gelu_bwd(residuals, g):
    a, b, pre = residuals
    # GELU's derivative and the bias gradient in one native pass (XLA's fusion of the exact GELU's
    # derivative took ~20 ms per [12000, 1536] block of whisper tiny's encoder, plus a reduction)
    shapes = (jax.ShapeDtypeStruct(pre.shape, jnp.float32), jax.ShapeDtypeStruct(pre.shape[1:], jnp.float32))
    d_pre, d_bias = jax.ffi.ffi_call("jaxasr_gelu_grad", shapes, vmap_method="sequential")(g, pre)
    return product(d_pre, b, trans_b=True), product(a, d_pre, trans_a=True), d_bias


dense_gelu.defvjp(_dense_gelu_fwd, _dense_gelu_bwd)


def cross_entropy_stats(logits, labels):
    """Per row of float32 logits [N, V] and int labels [N]: (log-sum-exp, the label's logit, 1.0
    where that logit is the row's largest else 0.0, the row's mean), each [N]; one pass a row."""
    _require()
    shape = jax.ShapeDtypeStruct(labels.shape, jnp.float32)
    call = jax.ffi.ffi_call("jaxasr_cross_entropy", (shape,) * 4, vmap_method="sequential")
    return call(logits, labels.astype(jnp.int32))


def cross_entropy_grad(logits, labels, lse, a, b):
    """a (softmax - one_hot(labels)) + b (softmax - 1/V) per row of logits [N, V], from their
    log-sum-exp: the token loss's gradient (a: the NLL's weight, b: label smoothing's)."""
    _require()
    call = jax.ffi.ffi_call("jaxasr_cross_entropy_grad", jax.ShapeDtypeStruct(logits.shape, jnp.float32),
                            vmap_method="sequential")
    return call(logits, labels.astype(jnp.int32), lse, a, b)


def eigh(x, *, gram: bool = False):
    """(w ascending [..., N], v [..., N, N] with eigenvectors as columns) of symmetric float32
    x [..., N, N], as `jnp.linalg.eigh`, or with `gram` of x^T x for x [..., M, N] (formed by
    ssyrk, half a matmul). A batch's matrices are solved in parallel (ssyevd, one per pool
    thread). Not differentiable."""
    _require()
    n = x.shape[-1]
    shapes = (jax.ShapeDtypeStruct(x.shape[:-2] + (n,), jnp.float32),
              jax.ShapeDtypeStruct(x.shape[:-2] + (n, n), jnp.float32))
    return jax.ffi.ffi_call("jaxasr_eigh", shapes, vmap_method="broadcast_all")(x, gram=gram)


def polar(x):
    """Orthogonal polar factor of each float32 matrix x [..., M, N], the matrices of a batch in
    parallel: for a long matrix with a well-conditioned Gram matrix G of its short side
    x G^{-1/2} (eigendecomposition of G, error ~ eps cond(G)), otherwise U V^T from the thin SVD
    (sgesdd). Not differentiable."""
    _require()
    return jax.ffi.ffi_call("jaxasr_polar", jax.ShapeDtypeStruct(x.shape, jnp.float32), vmap_method="broadcast_all")(x)


def attention(q, k, v):
    """softmax(q k^T) v per head for float32 q (pre-scaled) [B, T, H, D] and k, v [B, S, H, D]:
    the output and each query's log-sum-exp [B, T, H]."""
    _require()
    shapes = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(q.shape[:3], jnp.float32))
    return jax.ffi.ffi_call("jaxasr_attention", shapes, vmap_method="sequential")(q, k, v)


def attention_backward(q, k, v, out, lse, d_out):
    """Gradients (dq, dk, dv) of `attention` from its inputs, output, log-sum-exp and d_out."""
    _require()
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    return jax.ffi.ffi_call("jaxasr_attention_backward", shapes, vmap_method="sequential")(q, k, v, out, lse, d_out)


if __name__ == "__main__":  # `python -m jaxasr.kernels.cpu`: build now and say where
    logging.basicConfig()
    print("built:", available(), "cache:", cache_dir())
    x = np.random.default_rng(0).standard_normal((256, 64), np.float32)
    if available():
        print("max |matmul - numpy|:", float(np.abs(np.asarray(matmul(x, x.T)) - x @ x.T).max()))
