"""TSV-M, BoostedTSV-M, Iso-C, Iso-CTS and PCB against plain NumPy transcriptions of their reference
code (written here from the papers' repositories and the issue's definitions, not from ours), plus
the properties that define them: orthogonal combined bases, isotropic spectra, rank bounds, and
merging one model into itself."""

from __future__ import annotations

import numpy as np
import pytest

from jaxasr.merging import merge_deltas
from tests.merging.conftest import leaves, random_tree

TOL = dict(rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- NumPy references
def np_polar(x):
    u, _, vt = np.linalg.svd(x, full_matrices=False)
    return u @ vt


def np_tsv_m(tvs):
    """get_tsv_merge of AntoAndGar/task_singular_vectors (src/utils/TSVM_utils.py)."""
    n_tasks = len(tvs)
    u, s, vt = np.linalg.svd(np.stack(tvs), full_matrices=False)
    rp = min(u.shape[1], vt.shape[2]) // n_tasks
    u, s, vt = u[:, :, :rp], s[:, :rp], vt[:, :rp, :]
    b, di, _ = u.shape
    u_hat = u.transpose(1, 0, 2).reshape(di, b * rp)
    vt_hat = vt.reshape(b * rp, -1)
    return np_polar(u_hat) @ np.diag(s.reshape(-1)) @ np_polar(vt_hat.T).T


def np_newton_schulz(m, steps=5):
    """The issue's formula as written: X0 = M/||M||_F, X <- aX + b(XX^T)X + c(XX^T)^2 X."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = m / np.linalg.norm(m)
    for _ in range(steps):
        g = x @ x.T
        x = a * x + b * g @ x + c * g @ g @ x
    return x


def np_boost(s, beta):
    k = len(s)
    energy = np.cumsum(s**2) / np.sum(s**2)
    j = next(i for i in range(k) if energy[i] >= beta - 1e-7 * (beta >= 1))
    return np.where(s < s[j], s[j], s)


def np_boosted_tsv_m(tvs, beta):
    n_tasks = len(tvs)
    us, ss, vs = [], [], []
    for tv in tvs:
        u, s, vt = np.linalg.svd(tv, full_matrices=False)
        k = min(tv.shape) // n_tasks
        us.append(u[:, :k])
        ss.append(np_boost(s[:k], beta))
        vs.append(vt[:k])
    return np_newton_schulz(np.concatenate(us, 1)) @ np.diag(np.concatenate(ss)) @ np_newton_schulz(
        np.concatenate(vs, 0))


def np_iso_c(tvs):
    """ISO_C of the Iso-merging code: SVD of the sum (mean * T), singular values -> their mean."""
    u, s, vt = np.linalg.svd(sum(tvs), full_matrices=False)
    return u @ np.diag(np.full_like(s, s.mean())) @ vt


def np_iso_cts(tvs, common_space_fraction=0.8):
    """iso_cts of danielm1405/iso-merging, transcribed loop for loop."""
    shape = tvs[0].shape
    n = len(tvs)
    common = int(min(shape) * common_space_fraction)
    total = round((min(shape) - common) / n) * n
    common = min(shape) - total
    u, s, v = np.linalg.svd(sum(tvs), full_matrices=False)
    cu, cs, cv = u[:, :common], s[:common], v[:common, :]
    per = int((min(shape) - common) / n)
    r = min(shape)
    comb_u, comb_s, comb_v = np.zeros((shape[0], r)), np.zeros(r), np.zeros((r, shape[1]))
    for i, w in enumerate(tvs):
        w_ts = w - cu @ cu.T @ w
        ut, st, vt = np.linalg.svd(w_ts, full_matrices=False)
        comb_u[:, i * per:(i + 1) * per] = ut[:, :per]
        comb_s[i * per:(i + 1) * per] = st[:per]
        comb_v[i * per:(i + 1) * per, :] = vt[:per, :]
    comb_u[:, n * per:n * per + common] = cu
    comb_s[n * per:n * per + common] = cs
    comb_v[n * per:n * per + common, :] = cv
    comb_s = np.full_like(comb_s, comb_s.mean())
    return np_polar(comb_u) @ np.diag(comb_s) @ np_polar(comb_v)


def np_pcb(tvs, pcb_ratio=0.1):
    """PCB_merge of duguodong7/pcb-merging (pcb-merging.py), on one flattened weight."""

    def normalize(x, dim):
        return (x - x.min(dim, keepdims=True)) / (x.max(dim, keepdims=True) - x.min(dim, keepdims=True))

    def clamp(x, min_ratio=0.0, max_ratio=0.0):
        d = x.shape[1]
        sx = np.sort(x, axis=1)
        return np.clip(x, sx[:, int(d * min_ratio)][:, None], sx[:, int(d * (1 - max_ratio) - 1)][:, None])

    checks = np.stack([t.reshape(-1) for t in tvs]).astype(np.float64)
    n = len(tvs)
    abs_c = clamp(np.abs(checks), 0.0001, 0.0001)
    clamped = np.sign(checks) * abs_c
    self_pcb = np.exp(n * normalize(abs_c, 1) ** 2)
    cross = np.tanh(checks * checks.sum(0))
    scale = normalize(clamp(self_pcb * cross, 1 - pcb_ratio, 0), 1)
    return (np.sum(clamped * scale, 0) / np.maximum(scale.sum(0), 1e-12)).reshape(tvs[0].shape)


REFERENCES = {
    "tsv_m": (np_tsv_m, {}),
    "boosted_tsv_m": (lambda t: np_boosted_tsv_m(t, 0.3), {}),
    "iso_c": (np_iso_c, {}),
    "iso_cts": (np_iso_cts, {}),
    "pcb": (np_pcb, {"ratio": 0.1}),
}


# tall, wide and 1-D: the cases the SVD methods treat differently
REF_SHAPES = {"w": (64, 48), "p": (48, 64), "b": (48,)}


def task_trees(num_tasks, seed=0, shapes=REF_SHAPES):
    rng = np.random.default_rng(seed)
    return [random_tree(rng, 0.1, shapes) for _ in range(num_tasks)]


@pytest.mark.parametrize("name,num_tasks", [(n, 3) for n in sorted(REFERENCES)] + [("tsv_m", 5)])
def test_matches_numpy_reference(name, num_tasks):
    ref, params = REFERENCES[name]
    tvs = task_trees(num_tasks)
    ours = leaves(merge_deltas(name, tvs, **params))
    per_task = [leaves(t) for t in tvs]
    for path, got in ours.items():
        xs = [p[path].astype(np.float64) for p in per_task]
        if name != "pcb" and np.ndim(got) != 2:
            expected = np.mean(xs, axis=0)  # the references average every leaf that is not 2-D
        else:
            expected = ref(xs)
        np.testing.assert_allclose(got, expected, err_msg=f"{name} {path}", **TOL)


def test_boost_beta_one_is_plain_newton_schulz_tsv():
    tvs = task_trees(3, seed=1, shapes={"w": (64, 48)})
    got = merge_deltas("boosted_tsv_m", tvs, beta=1.0)["w"]
    xs = [t["w"].astype(np.float64) for t in tvs]
    np.testing.assert_allclose(got, np_boosted_tsv_m(xs, 1.0), **TOL)
    # ... and boosting at beta=0.3 does change it (the test above could not pass by ignoring beta)
    assert not np.allclose(merge_deltas("boosted_tsv_m", tvs, beta=0.3)["w"], got, atol=1e-4)


# --------------------------------------------------------------------------- properties
def low_rank(rng, m, n, r, scale=0.1):
    return (scale * rng.standard_normal((m, r)) @ rng.standard_normal((r, n)) / np.sqrt(r)).astype(np.float32)


def test_tsv_m_bases_are_orthogonal_and_rank_bounded():
    """With orthonormal U_perp, V_perp the merged delta's singular values are exactly the kept ones,
    and its rank is at most T * floor(min(m, n) / T)."""
    rng = np.random.default_rng(2)
    tvs = [{"w": (0.1 * rng.standard_normal((64, 48))).astype(np.float32)} for _ in range(5)]
    got = merge_deltas("tsv_m", tvs)["w"]
    k = 48 // 5
    kept = np.sort(np.concatenate([np.linalg.svd(t["w"], compute_uv=False)[:k] for t in tvs]))[::-1]
    sv = np.linalg.svd(got, compute_uv=False)
    np.testing.assert_allclose(sv[:5 * k], kept, rtol=1e-4)
    assert np.all(sv[5 * k:] < 1e-5 * sv[0])


def test_tsv_m_of_one_task_is_that_task():
    rng = np.random.default_rng(3)
    tv = {"w": (0.1 * rng.standard_normal((64, 48))).astype(np.float32), "b": rng.standard_normal(48).astype(np.float32)}
    got = merge_deltas("tsv_m", [tv])
    np.testing.assert_allclose(got["w"], tv["w"], atol=1e-5)
    np.testing.assert_allclose(got["b"], tv["b"], atol=1e-6)


@pytest.mark.parametrize("name", ["iso_c", "iso_cts"])
def test_iso_spectrum_is_flat(name):
    """Isotropic merging: every singular value of the merged delta is the same."""
    rng = np.random.default_rng(4)
    tvs = [{"w": low_rank(rng, 64, 48, 6)} for _ in range(3)]
    sv = np.linalg.svd(merge_deltas(name, tvs)["w"], compute_uv=False)
    np.testing.assert_allclose(sv, np.full_like(sv, sv.mean()), rtol=1e-4)
    summed = np.linalg.svd(sum(t["w"] for t in tvs), compute_uv=False)
    if name == "iso_c":  # the level is the mean singular value of the summed task matrices
        np.testing.assert_allclose(sv.mean(), summed.mean(), rtol=1e-4)


def test_iso_cts_common_space_spans_the_sum():
    """With common_space_fraction=1 there is no task-specific part: Iso-CTS is Iso-C."""
    tvs = task_trees(3, seed=5, shapes={"w": (64, 48)})
    np.testing.assert_allclose(merge_deltas("iso_cts", tvs, common_space_fraction=1.0)["w"],
                               merge_deltas("iso_c", tvs)["w"], rtol=1e-4, atol=1e-5)


def test_pcb_of_copies_keeps_the_top_ratio_of_the_task_vector():
    """Merging a model into itself: every task gets the same balancing scale, which is zero outside
    the top `ratio` share per task, so PCB returns the (outlier-clamped) task vector there and zero
    elsewhere."""
    tv = task_trees(1, seed=6, shapes={"w": (64, 48)})[0]
    got = merge_deltas("pcb", [tv, tv, tv], ratio=0.1)["w"]
    kept = got != 0
    assert abs(kept.mean() - 0.1) < 0.01
    assert np.sum(~np.isclose(got[kept], tv["w"][kept], rtol=1e-6, atol=0)) <= 1  # the clamped top entry
    assert np.all(np.abs(got) <= np.abs(tv["w"]) + 1e-7)
