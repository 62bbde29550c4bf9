"""Merging methods that work in the singular-vector subspaces of each 2-D weight.

Each kernel takes the task vectors of one weight stacked as `(T, *shape)` and returns the merged
delta of that weight; the driver in `methods.py` vmaps it over all weights of one shape under jit.
Only 2-D weights are decomposed; every other leaf (biases, norms, conv kernels) is averaged over
tasks, as the reference implementations do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxasr.kernels import cpu as cpu_kernels


def _t(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def top_svd(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The k leading singular triplets (u [..., m, k], s [..., k], vt [..., k, n]) of x [..., m, n],
    from the eigendecomposition of its smaller Gram matrix: on a CPU a symmetric eigensolver plus
    matmuls costs about a third of an SVD, and the leading triplets, which TSV-M keeps, come out
    accurately (the relative error of the i-th grows as eps * (s_1 / s_i)^2; TSV-M weights it by
    s_i). Not for polar factors: those need every direction, small ones included (`polar`)."""
    if x.shape[-2] < x.shape[-1]:
        v, s, ut = top_svd(_t(x), k)
        return _t(ut), s, _t(v)
    w, q = _gram_eigh(x)  # ascending
    w, q = w[..., ::-1][..., :k], q[..., ::-1][..., :k]
    s = jnp.sqrt(jnp.maximum(w, 0.0))
    u = (x @ q) / jnp.where(s > 0, s, 1.0)[..., None, :]  # a zero singular value leaves u = 0
    return u, s, _t(q)


def _gram_eigh(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigendecomposition of x^T x. On one CPU device the native kernel: the Gram matrix by ssyrk
    and a batch's matrices solved in parallel (jaxlib's one at a time left a core idle through
    most of each reduction: 2x slower on 16 of 768 x 768)."""
    if cpu_kernels.applies(x):
        return cpu_kernels.eigh(x, gram=True)
    return jnp.linalg.eigh(_t(x) @ x)


def polar(x: jax.Array) -> jax.Array:
    """Orthogonal polar factor P Q^T of x = P S Q^T (the nearest matrix with orthonormal columns/rows).
    On one CPU device the native kernel: a batch's matrices in parallel, and a long, well-conditioned
    matrix (TSV-M's concatenated bases of a long side) through its Gram matrix, not an SVD (1.7x
    faster than jaxlib's SVD on 16 concatenated 768 x 768 bases, 3x on 3072 x 768 ones)."""
    if cpu_kernels.applies(x):
        return cpu_kernels.polar(x)
    p, _, qt = jnp.linalg.svd(x, full_matrices=False)
    return p @ qt


# Muon's quintic coefficients: they push all singular values into about [0.7, 1.2] in 5 steps
# rather than converging to exactly 1, which is the point (cheap, matmul-only).
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(x: jax.Array, steps: int = 5, coeffs: tuple[float, float, float] = NS_COEFFS) -> jax.Array:
    """Approximate polar factor by quintic Newton-Schulz: X0 = M/||M||_F, X <- aX + b(XX^T)X + c(XX^T)^2 X."""
    a, b, c = coeffs
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # (XX^T)X = X(X^TX): iterate on the transpose so the Gram matrix is the small one
        x = x.T
    x = x / jnp.maximum(jnp.linalg.norm(x), 1e-30)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def _mean_if_not_2d(tvs: jax.Array) -> jax.Array | None:
    return None if tvs.ndim == 3 else jnp.mean(tvs, axis=0)


def boost_singular_values(s: jax.Array, beta: float) -> jax.Array:
    """Raise every singular value below sigma_{j*} to sigma_{j*}, with j* the first index whose
    cumulative energy share reaches beta (rows of `s` sorted descending; beta >= 1: unchanged)."""
    if beta >= 1.0:
        return s
    energy = jnp.cumsum(s * s, axis=-1)
    # dividing by the last cumulative sum (not a separate sum) makes the last share exactly 1
    share = energy / jnp.maximum(energy[..., -1:], 1e-30)
    j = jnp.argmax(share >= beta, axis=-1)
    floor = jnp.take_along_axis(s, j[..., None], axis=-1)
    return jnp.maximum(s, floor)


def _tsv(tvs: jax.Array, ortho, boost_beta: float | None) -> jax.Array:
    mean = _mean_if_not_2d(tvs)
    if mean is not None:
        return mean
    t, m, n = tvs.shape
    k = min(m, n) // t
    if k == 0:  # more tasks than dimensions: nothing is kept
        return jnp.zeros((m, n), tvs.dtype)
    u, s, vt = top_svd(tvs, k)  # batched over tasks
    if boost_beta is not None:
        s = boost_singular_values(s, boost_beta)
    u_cat = jnp.transpose(u, (1, 0, 2)).reshape(m, t * k)  # task blocks side by side
    vt_cat = vt.reshape(t * k, n)
    return (ortho(u_cat) * s.reshape(-1)) @ ortho(vt_cat)


def tsv_m(tvs: jax.Array) -> jax.Array:
    """TSV-M (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging",
    CVPR 2025; AntoAndGar/task_singular_vectors). Keep the top floor(min(m,n)/T) singular triplets of
    each task, concatenate the U and the V blocks, replace each by its polar factor, and recombine
    with the concatenated singular values."""
    return _tsv(tvs, polar, None)


def boosted_tsv_m(tvs: jax.Array, *, beta: float = 0.3, steps: int = 5) -> jax.Array:
    """BoostedTSV-M: TSV-M with each task's kept singular values boosted (`boost_singular_values`)
    and the concatenated bases orthogonalized by `steps` quintic Newton-Schulz iterations."""
    return _tsv(tvs, lambda x: newton_schulz(x, steps), beta)


def iso_c(tvs: jax.Array) -> jax.Array:
    """Iso-C (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
    Task-Specific Subspaces", arXiv 2502.04959): SVD of the summed task matrices with all singular
    values replaced by their mean."""
    mean = _mean_if_not_2d(tvs)
    if mean is not None:
        return mean
    u, s, vt = jnp.linalg.svd(jnp.sum(tvs, axis=0), full_matrices=False)
    return (u * jnp.mean(s)) @ vt


def iso_cts_sizes(r: int, num_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(common dims, dims per task) as the reference computes them: the task-specific total is
    rounded (Python's round, as there) to a multiple of the number of tasks."""
    common = int(r * common_space_fraction)
    specific_total = round((r - common) / num_tasks) * num_tasks
    common = r - specific_total
    return common, int((r - common) / num_tasks)


def iso_cts(tvs: jax.Array, *, common_space_fraction: float = 0.8) -> jax.Array:
    """Iso-CTS (arXiv 2502.04959, danielm1405/iso-merging): the top singular directions of the summed
    matrix (a `common_space_fraction` of them), plus, per task, the top directions of its residual
    after projecting out that common space; the concatenated bases are orthogonalized (polar
    factor) and all singular values set to their mean."""
    mean = _mean_if_not_2d(tvs)
    if mean is not None:
        return mean
    t, m, n = tvs.shape
    r = min(m, n)
    common, per_task = iso_cts_sizes(r, t, common_space_fraction)
    u, s, vt = jnp.linalg.svd(jnp.sum(tvs, axis=0), full_matrices=False)
    uc, sc, vc = u[:, :common], s[:common], vt[:common]
    us, ss, vs = [], [], []
    if per_task:
        residual = tvs - uc @ (uc.T @ tvs)  # broadcast over tasks
        ut, st, vtt = jnp.linalg.svd(residual, full_matrices=False)
        us = [jnp.transpose(ut[:, :, :per_task], (1, 0, 2)).reshape(m, t * per_task)]
        ss = [st[:, :per_task].reshape(-1)]
        vs = [vtt[:, :per_task, :].reshape(t * per_task, n)]
    # task-specific blocks first, then the common one, as in the reference (order matters only
    # through floating point: the polar factor of a column permutation is permuted alike)
    u_all = jnp.concatenate(us + [uc], axis=1)
    s_all = jnp.concatenate(ss + [sc])
    v_all = jnp.concatenate(vs + [vc], axis=0)
    return (polar(u_all) * jnp.mean(s_all)) @ polar(v_all)
