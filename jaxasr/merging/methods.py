"""Merging methods over task vectors, and the jitted, grouped driver that runs them on whole trees.

Every method is a kernel `kernel(tvs, base, key, **params) -> delta` over ONE weight: `tvs` are the
task vectors of that weight stacked `(T, *shape)` in float32, `base` the base weight (or None when
merging bare deltas such as LoRA updates), `key` a PRNG key (used by DARE only). `merge_deltas`
groups a tree's leaves by shape, stacks each group `(G, T, *shape)`, and runs
`jit(vmap(kernel))` on it, one group at a time, so the per-weight SVDs of the subspace methods are
batched and only one group is on the device at once.

Methods other than TSV-M, BoostedTSV-M, Iso-C, Iso-CTS (`subspace.py`) and PCB follow mergekit's
`merge_methods/` (0.1.5), including its defaults, so that a mergekit config and ours agree:
`merge(...)` with alpha = mergekit's `lambda` (1 by default) gives mergekit's merged tensor.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxasr.merging import subspace
from jaxasr.merging.task_vectors import Tree, apply_delta, check_same_structure, shape_groups, task_vectors

log = logging.getLogger(__name__)

DEFAULT_MAX_GROUP_BYTES = 1 << 30


# --------------------------------------------------------------------------- weighted sums
def _task_weights(weights, t: int) -> jax.Array:
    return jnp.ones((t,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)


def _bcast(w: jax.Array, ndim: int) -> jax.Array:
    return w.reshape(w.shape + (1,) * (ndim - 1))


def soup(tvs, base, key, *, weights=None):
    """Model Soup (Wortsman et al., arXiv 2203.05482): weighted average; mergekit `linear`."""
    w = _task_weights(weights, tvs.shape[0])
    return jnp.sum(_bcast(w, tvs.ndim) * tvs, axis=0) / jnp.sum(w)


# --------------------------------------------------------------------------- sparsification
def _sortable_bits(v):
    """uint32 keys ordered as the float32 values are (positive: flip the sign bit; negative: all bits;
    -0.0 made +0.0 first, as the two compare equal)."""
    v = v.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(jnp.where(v == 0, jnp.float32(0), v), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


_SAMPLE = 16384  # keys sampled to bracket the j-th smallest before bisecting


def _lowest(v, j: int):
    """Mask of the j smallest entries of the flat `v`, ties to the lower index: exactly what the first
    j entries of a stable `argsort(v)` select. A sort of millions of entries is slow on XLA:CPU, so
    the j-th smallest value is found by bisection over its 32 bits (one counting pass per step),
    started from a bracket read off a sorted sample (checked by two counts, else the full range):
    about 20 passes instead of 32. Entries tied with it are taken in index order."""
    n = v.size
    if j <= 0:
        return jnp.zeros((n,), bool)
    if j >= n:
        return jnp.ones((n,), bool)
    key = _sortable_bits(v)
    sample = jnp.sort(key[:: max(1, n // _SAMPLE)])
    m = sample.size
    margin = 2 * math.isqrt(m) + 2  # 4 sd of the sample rank of the j-th smallest: sqrt(m p (1 - p)) <= sqrt(m) / 2
    at = j * m // n
    lo, hi = sample[max(0, at - margin)], sample[min(m - 1, at + margin)]
    lo = jnp.where(jnp.sum(key < lo) < j, lo, jnp.uint32(0))  # the answer is >= lo
    hi = jnp.where(jnp.sum(key <= hi) >= j, hi, jnp.uint32(0xFFFFFFFF))  # ... and <= hi

    def halve(lohi):  # invariant: the j-th smallest key lies in [lo, hi]
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(key <= mid) >= j
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    kth, _ = jax.lax.while_loop(lambda lohi: lohi[0] < lohi[1], halve, (lo, hi))
    below = key < kth
    tied = key == kth
    return below | (tied & (jnp.cumsum(tied) <= j - jnp.sum(below)))


def _magnitude_mask(x, density: float):
    """Keep the k = max(1, int(density * numel)) largest magnitudes (mergekit `magnitude`, whose
    stable descending argsort breaks ties by index)."""
    k = max(1, int(density * x.size))
    return _lowest(-jnp.abs(x).reshape(-1), k).astype(x.dtype).reshape(x.shape)


def _outlier_mask(x, density: float, gamma: float):
    """Drop the gamma share of largest magnitudes, then the smallest, keeping int(density * numel)
    (mergekit `magnitude_outliers`, Model Breadcrumbs: ranks [n_bot, n_bot + target) of an ascending
    stable argsort)."""
    n = x.size
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    a = jnp.abs(x).reshape(-1)
    keep = _lowest(a, n_bot + target) & ~_lowest(a, n_bot)
    return keep.astype(x.dtype).reshape(x.shape)


def _rescale_l1(x, masked, eps: float = 1e-7):
    """Match the L1 norm of the unmasked tensor (mergekit `rescaled_masked_tensor`, norm l1)."""
    before, after = jnp.sum(jnp.abs(x)), jnp.sum(jnp.abs(masked))
    ok = (before >= eps) & (after >= eps)
    return jnp.where(ok, masked * (before / jnp.where(ok, after, 1.0)), masked)


def _sparsify(x, how: str | None, density: float, gamma: float, rescale: bool, key):
    if how is None or density >= 1:
        return x
    if density <= 0 and how == "magnitude":
        return jnp.zeros_like(x)
    if how == "magnitude":
        mask = _magnitude_mask(x, density)
    elif how == "magnitude_outliers":
        mask = _outlier_mask(x, density, gamma)
    elif how == "random":
        mask = jax.random.bernoulli(key, density, x.shape).astype(x.dtype)
    else:
        raise ValueError(f"unknown sparsification {how!r}")
    masked = x * mask
    return _rescale_l1(x, masked) if rescale else masked


def sign_consensus(deltas, method: str = "sum"):
    """TIES sign election: 1 where an entry agrees with the elected sign (sum of values, or count
    of signs), ties going to +."""
    sign = jnp.sign(deltas)
    total = jnp.sum(deltas if method == "sum" else sign, axis=0)
    return sign == jnp.where(total >= 0, 1.0, -1.0)


def generalized_task_arithmetic(tvs, base, key, *, weights=None, density=1.0, gamma=0.01,
                                sparsify: str | None = None, consensus: str | None = None,
                                normalize: bool = False, rescale: bool = False):
    """mergekit's `GeneralizedTaskArithmeticMerge`: sparsify each task vector, weight, optionally
    elect signs (TIES) and divide by the weight that survived. Task Arithmetic, TIES, DARE and
    breadcrumbs are settings of it (see METHODS)."""
    t = tvs.shape[0]
    w = _task_weights(weights, t)
    dens = (density,) * t if np.ndim(density) == 0 else tuple(density)
    deltas = jnp.stack([
        _sparsify(tvs[i], sparsify, float(dens[i]), gamma, rescale,
                  None if key is None else jax.random.fold_in(key, i))
        for i in range(t)])
    wb = _bcast(w, tvs.ndim)
    deltas = deltas * wb
    if consensus is not None:
        mask = sign_consensus(deltas, consensus).astype(deltas.dtype)
        mixed = jnp.sum(deltas * mask, axis=0)
        divisor = jnp.sum(wb * mask, axis=0)
        divisor = jnp.where(divisor == 0, 1.0, divisor)
    else:
        mixed = jnp.sum(deltas, axis=0)
        divisor = jnp.sum(w)
        divisor = jnp.where(jnp.abs(divisor) < 1e-8, 1.0, divisor)
    return mixed / divisor if normalize else mixed


# --------------------------------------------------------------------------- SCE
def sce(tvs, base, key, *, select_topk: float = 1.0):
    """SCE (Wan et al., "FuseChat", arXiv 2408.07990; mergekit `sce`): keep the entries of highest
    variance across tasks, elect signs, weight each task by its mean squared delta."""
    t = tvs.shape[0]
    if select_topk <= 0:
        tvs = tvs * 0
    elif select_topk < 1:
        var = jnp.var(tvs, axis=0)
        # k depends on the data (nonzero variances), so rank-compare instead of a static top_k
        k = jnp.floor(jnp.count_nonzero(var) * select_topk)
        order = jnp.argsort(-jnp.abs(var).reshape(-1))
        ranks = jnp.zeros(var.size, jnp.int32).at[order].set(jnp.arange(var.size, dtype=jnp.int32))
        tvs = tvs * (ranks < k).astype(tvs.dtype).reshape(var.shape)[None]
    erase = sign_consensus(tvs, "sum").astype(tvs.dtype)
    energy = jnp.mean(jnp.square(tvs.reshape(t, -1)), axis=1)
    total = jnp.sum(energy)
    w = jnp.where(jnp.abs(total) < 1e-6, 1.0 / t, energy / jnp.where(total == 0, 1.0, total))
    erased = _bcast(w, tvs.ndim) * erase
    return jnp.sum(tvs * erased, axis=0) / jnp.maximum(jnp.sum(erased, axis=0), 1e-6)


# --------------------------------------------------------------------------- geometric
def model_stock(tvs, base, key, *, filter_wise: bool = False):
    """Model Stock (Jang et al., arXiv 2403.19522; mergekit `model_stock`): interpolate between the
    base and the experts' average by t = T cos / (1 + (T-1) cos), cos the mean pairwise cosine of
    the task vectors (per whole tensor, or per row with `filter_wise`)."""
    t = tvs.shape[0]
    if t < 2:
        raise ValueError("model_stock needs at least two task vectors")
    shape = tvs.shape[1:]
    if filter_wise:
        x = tvs[:, None] if tvs.ndim == 2 else tvs
    else:
        x = tvs.reshape(t, -1)
    norms = jnp.linalg.norm(x, axis=-1)
    cos = [jnp.clip(jnp.sum(x[i] * x[j], -1) / jnp.maximum(norms[i] * norms[j], 1e-6), -1, 1)
           for i in range(t) for j in range(i + 1, t)]
    cos = jnp.mean(jnp.stack(cos), axis=0)[..., None]
    den = 1 + (t - 1) * cos
    singular = jnp.abs(den) < 1e-6  # no finite estimate: keep the base there
    ratio = jnp.where(singular, 0.0, t * cos / jnp.where(singular, 1.0, den))
    # t * avg + (1 - t) * base = base + t * mean(task vectors)
    return (ratio * jnp.mean(x, axis=0)).reshape(shape)


def karcher(tvs, base, key, *, max_iter: int = 10, tol: float = 1e-5):
    """Karcher (Riemannian) mean of the experts' weights on the unit sphere, rescaled by their mean
    norm (arXiv 2603.04972; mergekit `karcher`). Works on the weights base + tv as mergekit does;
    with no base, on the deltas themselves."""
    pts = tvs if base is None else tvs + base[None]
    t = pts.shape[0]
    if t == 1:
        return tvs[0]
    flat = pts.reshape(t, -1)
    norms = jnp.linalg.norm(flat, axis=1)
    units = flat / jnp.where(norms == 0, 1.0, norms)[:, None]
    valid = norms > tol
    alphas = jnp.full((t,), 1.0 / t)
    va = jnp.where(valid, alphas, 0.0)
    na = va / jnp.maximum(jnp.sum(va), 1e-30)
    mean = na @ units
    mean_norm = jnp.linalg.norm(mean)
    mean = jnp.where(mean_norm < tol, units[jnp.argmax(valid)], mean / jnp.where(mean_norm == 0, 1.0, mean_norm))

    def step(_, carry):
        mean, done = carry
        dot = jnp.clip(units @ mean, -1.0, 1.0)
        theta = jnp.arccos(dot)
        use = valid & (theta >= tol)
        coef = jnp.where(use, na * theta / jnp.where(use, jnp.sin(theta), 1.0), 0.0)
        tangent = coef @ (units - dot[:, None] * mean)
        tn = jnp.linalg.norm(tangent)
        stop = done | (tn < tol)  # mergekit breaks out of its loop here
        new = jnp.cos(tn) * mean + jnp.sin(tn) * tangent / jnp.where(tn == 0, 1.0, tn)
        un = jnp.linalg.norm(new)
        new = jnp.where(un > tol, new / jnp.where(un == 0, 1.0, un), new)
        return jnp.where(stop, mean, new), stop

    mean, _ = jax.lax.fori_loop(0, max_iter, step, (mean, jnp.array(False)))
    out = jnp.where(jnp.any(valid), jnp.sum(alphas * norms) * mean, 0.0).reshape(tvs.shape[1:])
    return out if base is None else out - base


def multislerp(tvs, base, key, *, weights=None, normalize_weights: bool = True, eps: float = 1e-8):
    """Multi-SLERP (Goddard, mergekit `multislerp`): barycentric interpolation of the task vectors on
    the hypersphere through the tangent space at their weighted mean direction, rescaled by the
    weighted mean norm. Where the weighted mean direction vanishes mergekit falls back to a linear
    mix for two inputs and raises otherwise; a jitted kernel cannot raise, so ours mixes linearly."""
    t = tvs.shape[0]
    if t == 1:
        return tvs[0]
    flat = tvs.reshape(t, -1)
    w = _task_weights(weights, t)
    if normalize_weights:
        w = w / jnp.sum(w)
    norms = jnp.linalg.norm(flat, axis=-1, keepdims=True)
    units = flat / (norms + eps)
    mean = w @ units
    mean_norm = jnp.linalg.norm(mean)
    mean = mean / jnp.where(mean_norm == 0, 1.0, mean_norm)
    tangents = units - (units @ mean)[:, None] * mean
    tangent = w @ tangents
    tn = jnp.linalg.norm(tangent) + eps
    result = (mean * jnp.cos(tn) + tangent * (jnp.sin(tn) / tn)) * jnp.sum(norms[:, 0] * w)
    return jnp.where(mean_norm < eps, w @ flat, result).reshape(tvs.shape[1:])


# --------------------------------------------------------------------------- PCB
def _minmax(x, axis):
    lo, hi = jnp.min(x, axis, keepdims=True), jnp.max(x, axis, keepdims=True)
    return (x - lo) / jnp.where(hi > lo, hi - lo, 1.0)  # the reference divides by zero here


def _clamp_rows(x, min_ratio: float, max_ratio: float):
    d = x.shape[1]
    s = jnp.sort(x, axis=1)
    return jnp.clip(x, s[:, int(d * min_ratio)][:, None], s[:, int(d * (1 - max_ratio) - 1)][:, None])


def pcb(tvs, base, key, *, ratio: float = 0.1, clamp_ratio: float = 1e-4):
    """PCB merging (Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024),
    transcribed from the reference `PCB_merge` (duguodong7/pcb-merging): intra-balancing
    exp(T * minmax(|tv|)^2) times inter-balancing tanh(tv * sum(tv)); only the top `ratio` of the
    product per task is kept (min-max normalized), and the outlier-clamped task vectors are averaged
    with it as weights. The reference flattens the whole model into one vector; here each weight is
    balanced on its own, so that the merge runs group by group."""
    t = tvs.shape[0]
    x = tvs.reshape(t, -1)
    mag = _clamp_rows(jnp.abs(x), clamp_ratio, clamp_ratio)
    clamped = jnp.sign(x) * mag
    intra = jnp.exp(t * _minmax(mag, 1) ** 2)
    inter = jnp.tanh(x * jnp.sum(x, axis=0))
    scale = _minmax(_clamp_rows(intra * inter, 1 - ratio, 0), 1)
    merged = jnp.sum(clamped * scale, axis=0) / jnp.maximum(jnp.sum(scale, axis=0), 1e-12)
    return merged.reshape(tvs.shape[1:])


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Method:
    kernel: Callable[..., jax.Array]
    defaults: Mapping[str, Any]
    random: bool = False  # needs a PRNG key
    uses_base: bool = False  # looks at the base weights, not only the task vectors
    per_task: tuple[str, ...] = ()  # parameters given one value per task
    decomposes: bool = False  # SVD/eigh per weight: LAPACK kernels on a CPU


def _gta(**fixed):
    return functools.partial(generalized_task_arithmetic, **fixed)


def _subspace(fn, defaults):
    return Method(lambda tvs, base, key, **kw: fn(tvs, **kw), defaults, decomposes=True)


METHODS: dict[str, Method] = {
    "soup": Method(soup, {"weights": None}, per_task=("weights",)),
    "task_arithmetic": Method(_gta(), {"weights": None, "normalize": False}, per_task=("weights",)),
    "ties": Method(_gta(sparsify="magnitude", consensus="sum"),
                   {"weights": None, "density": 1.0, "normalize": True, "rescale": False},
                   per_task=("weights", "density")),
    "dare_linear": Method(_gta(sparsify="random"),
                          {"weights": None, "density": 1.0, "normalize": False, "rescale": True},
                          random=True, per_task=("weights", "density")),
    "dare_ties": Method(_gta(sparsify="random", consensus="sum"),
                        {"weights": None, "density": 1.0, "normalize": False, "rescale": True},
                        random=True, per_task=("weights", "density")),
    "breadcrumbs": Method(_gta(sparsify="magnitude_outliers"),
                          {"weights": None, "density": 1.0, "gamma": 0.01, "normalize": False, "rescale": False},
                          per_task=("weights", "density")),
    "breadcrumbs_ties": Method(_gta(sparsify="magnitude_outliers", consensus="sum"),
                               {"weights": None, "density": 1.0, "gamma": 0.01, "normalize": False,
                                "rescale": False}, per_task=("weights", "density")),
    "sce": Method(sce, {"select_topk": 1.0}),
    "model_stock": Method(model_stock, {"filter_wise": False}),
    "karcher": Method(karcher, {"max_iter": 10, "tol": 1e-5}, uses_base=True),
    "multislerp": Method(multislerp, {"weights": None, "normalize_weights": True, "eps": 1e-8},
                         per_task=("weights",)),
    "pcb": Method(pcb, {"ratio": 0.1, "clamp_ratio": 1e-4}),
    "tsv_m": _subspace(subspace.tsv_m, {}),
    "boosted_tsv_m": _subspace(subspace.boosted_tsv_m, {"beta": 0.3, "steps": 5}),
    "iso_c": _subspace(subspace.iso_c, {}),
    "iso_cts": _subspace(subspace.iso_cts, {"common_space_fraction": 0.8}),
}


def _bind(name: str, params: Mapping[str, Any], num_tasks: int) -> tuple[tuple[str, Any], ...]:
    """Defaults filled in, per-task values as tuples (hashable: they key the compile cache)."""
    if name not in METHODS:
        raise ValueError(f"unknown merging method {name!r}; one of {sorted(METHODS)}")
    method = METHODS[name]
    unknown = set(params) - set(method.defaults)
    if unknown:
        raise ValueError(f"{name} takes {sorted(method.defaults)}, not {sorted(unknown)}")
    bound = {**method.defaults, **params}
    for p in method.per_task:
        v = bound[p]
        if v is not None and np.ndim(v) > 0:
            v = tuple(float(x) for x in v)
            if len(v) != num_tasks:
                raise ValueError(f"{name}: {p} has {len(v)} values for {num_tasks} task vectors")
        elif v is not None:
            v = float(v)
        bound[p] = v
    return tuple(sorted(bound.items()))


@functools.lru_cache(maxsize=None)
def _compiled(name: str, static: tuple[tuple[str, Any], ...], has_base: bool, random: bool, sharding):
    kernel = functools.partial(METHODS[name].kernel, **dict(static))

    def one(tvs, base, key, weights):
        extra = {} if weights is None else {"weights": weights}
        return kernel(tvs, base, key, **extra).astype(tvs.dtype)

    fn = jax.vmap(one, in_axes=(0, 0 if has_base else None, 0 if random else None, None))
    return jax.jit(fn, out_shardings=sharding)


def _stack_sharding(mesh) -> Any:
    if mesh is None:
        return None
    from jax.sharding import NamedSharding, PartitionSpec

    # the stack axis (weights of one shape) is split over every mesh axis: each device merges
    # whole weights, so no SVD is ever split across devices
    return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))


def merge_deltas(method: str, task_vectors: Sequence[Tree], *, base: Tree | None = None,
                 key: jax.Array | None = None, max_group_bytes: int = DEFAULT_MAX_GROUP_BYTES,
                 mesh=None, **params) -> Tree:
    """Merge task vectors (trees of equal structure) into one delta tree with `method`.

    `base` is needed only by methods that look at the weights themselves (karcher); `key` by the
    random ones (dare_*), each weight drawing from `fold_in(key, leaf index)` so results do not
    depend on grouping. Leaves of equal shape are merged together by one jitted vmapped call per
    group of at most `max_group_bytes` of stacked float32 input; with a `mesh`, each group is split
    over all its devices along the stack axis (CPU devices excepted for the SVD-based methods, which
    would hang jaxlib's LAPACK kernels there). Returns numpy arrays in each leaf's dtype (on the
    host, so device memory holds one group at a time).
    """
    tvs = list(task_vectors)
    check_same_structure(tvs + ([base] if base is not None else []),
                         [f"task vector {i}" for i in range(len(tvs))] + ["base"] * (base is not None))
    bound = _bind(method, params, len(tvs))
    random = METHODS[method].random
    if random and key is None:
        raise ValueError(f"{method} is random: pass a PRNG key")
    per_task, treedef = zip(*(jax.tree_util.tree_flatten(tv) for tv in tvs))
    treedef = treedef[0]
    if not METHODS[method].uses_base:
        base = None  # not sent to the device at all
    base_leaves = jax.tree_util.tree_leaves(base) if base is not None else None
    shapes = [np.shape(x) for x in per_task[0]]
    dtypes = [np.asarray(x).dtype for x in per_task[0]]
    cost = [(len(tvs) + (base is not None)) * 4 * math.prod(s) for s in shapes]
    if mesh is not None and METHODS[method].decomposes and all(d.platform == "cpu" for d in mesh.devices.flat):
        # jaxlib's CPU SVD/eigh spread a batch of matrices over the intra-op thread pool that all
        # CPU devices share; run from several devices at once, every pool thread can end up
        # waiting on batch work that no thread is left to run: a hang (jaxlib 0.10.2, >= 128x128).
        # CPU devices add no cores, so these methods run on one.
        log.info("%s on CPU: merging on one device, not over the %d-device mesh", method, mesh.size)
        mesh = None
    sharding = _stack_sharding(mesh)
    # task weights are traced, not compiled in: trying other weights (a grid, one-hot) reuses the
    # compiled merge; everything else (densities, ranks) fixes shapes or branches, so is static
    static = tuple((k, v) for k, v in bound if k != "weights")
    weights = None
    if "weights" in METHODS[method].defaults:
        w = dict(bound)["weights"]
        weights = jnp.asarray(np.broadcast_to(np.float32(1.0 if w is None else w), (len(tvs),)))
    fn = _compiled(method, static, base is not None, random, sharding)
    out: list[np.ndarray | None] = [None] * len(shapes)
    with jax.default_matmul_precision("highest"):  # no TF32/bf16 passes inside SVD-based merges
        for group in shape_groups(shapes, cost, max_group_bytes):
            # pad the stack to a multiple of the device count with copies of the first weight
            pad = (-len(group)) % (mesh.size if mesh is not None else 1)
            idx = group + [group[0]] * pad
            stack = np.stack([np.stack([np.asarray(leaves[i], np.float32) for leaves in per_task]) for i in idx])
            bstack = np.stack([np.asarray(base_leaves[i], np.float32) for i in idx]) if base is not None else None
            keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(idx)) if random else None
            if sharding is not None:
                stack = jax.device_put(stack, sharding)
                bstack = jax.device_put(bstack, sharding) if bstack is not None else None
                keys = jax.device_put(keys, sharding) if keys is not None else None
            merged = np.asarray(fn(stack, bstack, keys, weights))
            for j, i in enumerate(group):
                out[i] = merged[j].astype(dtypes[i])
    return jax.tree_util.tree_unflatten(treedef, out)


def merge(method: str, base: Tree, experts: Sequence[Tree], *, alpha: float = 1.0, **kwargs) -> Tree:
    """Merged parameters `base + alpha * merge_deltas(method, experts - base, base=base, ...)`."""
    delta = merge_deltas(method, task_vectors(experts, base), base=base, **kwargs)
    return apply_delta(base, delta, alpha)
