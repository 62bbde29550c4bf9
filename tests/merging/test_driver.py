"""The tree driver: structure, grouping, alpha, dtypes, PRNG keys, errors, and merging a model into
itself; the mesh placement runs in a subprocess with 4 host devices."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from jaxasr.merging import METHODS, apply_delta, merge, merge_deltas, shape_groups, task_vectors
from tests.merging.conftest import SMALL_SHAPES, leaves, make_base_and_experts, random_tree


def test_shape_groups_split_by_shape_and_budget():
    shapes = [(4, 4), (4,), (4, 4), (4, 4), (4,)]
    groups = shape_groups(shapes, [64, 16, 64, 64, 16], max_group_bytes=128)
    assert sorted(map(tuple, groups)) == [(0, 2), (1, 4), (3,)]
    assert shape_groups(shapes, [64] * 5, max_group_bytes=1) == [[0], [2], [3], [1], [4]]


@pytest.mark.parametrize("name,kwargs", [("tsv_m", {}), ("dare_linear", {"density": 0.4})])
def test_grouping_does_not_change_the_result(name, kwargs):
    tvs = task_vectors(*reversed(make_base_and_experts(np.random.default_rng(0), SMALL_SHAPES)))
    key = jax.random.key(3)
    one_by_one = merge_deltas(name, tvs, key=key, max_group_bytes=1, **kwargs)
    together = merge_deltas(name, tvs, key=key, **kwargs)
    for path, x in leaves(together).items():
        np.testing.assert_allclose(leaves(one_by_one)[path], x, rtol=1e-5, atol=1e-6, err_msg=path)


def test_merge_is_base_plus_alpha_delta_and_keeps_structure_and_dtype():
    rng = np.random.default_rng(1)
    base, experts = make_base_and_experts(rng, SMALL_SHAPES)
    base["enc"]["b"] = base["enc"]["b"].astype(jax.numpy.bfloat16)
    delta = merge_deltas("task_arithmetic", task_vectors(experts, base))
    merged = merge("task_arithmetic", base, experts, alpha=0.25)
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    assert merged["enc"]["b"].dtype == jax.numpy.bfloat16 and merged["enc"]["w1"].dtype == np.float32
    expected = base["enc"]["w1"] + 0.25 * sum(e["enc"]["w1"] - base["enc"]["w1"] for e in experts)
    np.testing.assert_allclose(merged["enc"]["w1"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(apply_delta(base, delta, 0.25)["enc"]["w1"], merged["enc"]["w1"], atol=1e-6)


SELF_MERGE = {
    "soup": {}, "task_arithmetic": {"weights": (1 / 3,) * 3}, "ties": {}, "sce": {},
    "model_stock": {}, "karcher": {}, "multislerp": {}, "breadcrumbs": {"weights": (1 / 3,) * 3},
}


@pytest.mark.parametrize("name", sorted(SELF_MERGE))
def test_merging_a_model_into_itself_gives_it_back(name):
    rng = np.random.default_rng(2)
    base = random_tree(rng, 1.0, SMALL_SHAPES)
    expert = random_tree(rng, 1.0, SMALL_SHAPES)
    merged = merge(name, base, [expert] * 3, **SELF_MERGE[name])
    for path, x in leaves(expert).items():
        np.testing.assert_allclose(leaves(merged)[path], x, rtol=1e-4, atol=1e-5, err_msg=f"{name} {path}")


def test_dare_keeps_density_and_follows_the_key():
    tvs = [{"w": np.ones((64, 48), np.float32)}]
    a = merge_deltas("dare_linear", tvs, key=jax.random.key(0), density=0.3, rescale=False)["w"]
    b = merge_deltas("dare_linear", tvs, key=jax.random.key(0), density=0.3, rescale=False)["w"]
    c = merge_deltas("dare_linear", tvs, key=jax.random.key(1), density=0.3, rescale=False)["w"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert abs(a.mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / a.size)
    rescaled = merge_deltas("dare_linear", tvs, key=jax.random.key(0), density=0.3)["w"]
    np.testing.assert_allclose(rescaled.sum(), a.size, rtol=1e-5)  # L1 norm kept


def test_errors():
    tvs = [{"w": np.ones((4, 4), np.float32)}] * 2
    with pytest.raises(ValueError, match="unknown merging method"):
        merge_deltas("nope", tvs)
    with pytest.raises(ValueError, match="PRNG key"):
        merge_deltas("dare_ties", tvs)
    with pytest.raises(ValueError, match="3 values for 2"):
        merge_deltas("soup", tvs, weights=(1, 2, 3))
    with pytest.raises(ValueError, match="takes"):
        merge_deltas("ties", tvs, dnesity=0.5)
    with pytest.raises(ValueError, match="structure"):
        merge_deltas("soup", [tvs[0], {"v": np.ones((4, 4), np.float32)}])
    assert len(METHODS) == 16


MESH_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from jaxasr.merging import merge_deltas
    from jaxasr.parallel.mesh import make_mesh
    assert jax.device_count() == 4
    rng = np.random.default_rng(0)
    # 3 weights of one shape on 4 devices (the stack is padded to 4), and 8 of 128x128: two per
    # device, where jaxlib's CPU SVDs once hung when run from several CPU devices at once
    shapes = [(32, 24)] * 3 + [(128, 128)] * 8
    tvs = [{f"w{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)} for _ in range(3)]
    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    for name, kw in [("ties", {"density": 0.5}), ("tsv_m", {})]:
        key = jax.random.key(0)
        a = merge_deltas(name, tvs, key=key, mesh=mesh, **kw)
        b = merge_deltas(name, tvs, key=key, **kw)
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
    print("MESH OK")
""")


def test_mesh_placement_gives_the_same_merge():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    try:
        proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT], env=env, capture_output=True, text=True,
                              timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("merging over a 4-device CPU mesh hung")
    assert proc.returncode == 0 and "MESH OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("j", [0, 1, 7, 500, 999, 1000])
def test_lowest_is_a_stable_argsort_prefix(j):
    """The bisection selection behind TIES/DARE/breadcrumbs masks picks what a stable argsort does,
    ties (here: many, of both signs and zeros) going to the lower index."""
    from jaxasr.merging.methods import _lowest

    v = np.round(np.random.default_rng(j).standard_normal(1000), 1).astype(np.float32)
    v[::50] = -0.0
    v[1::50] = 0.0
    expected = np.zeros(1000, bool)
    expected[np.argsort(v, kind="stable")[:j]] = True
    np.testing.assert_array_equal(np.asarray(jax.jit(_lowest, static_argnums=1)(v, j)), expected)


@pytest.mark.parametrize("case", ["gaussian", "skewed"])
def test_lowest_on_sampled_brackets(case):
    """Large inputs: the bisection starts from a bracket read off a strided sample; 'skewed' puts
    the answer where the sample has no entries, so the bracket's checks must fall back."""
    from jaxasr.merging.methods import _lowest

    n = 200_003
    rng = np.random.default_rng(7)
    v = np.round(rng.standard_normal(n), 2).astype(np.float32)
    if case == "skewed":
        v[:] = 1.0
        v[-50:] = -np.arange(50, dtype=np.float32)  # the 50 smallest sit between sample points
    fn = jax.jit(_lowest, static_argnums=1)
    for j in (1, 17, n // 5, n - 1):
        expected = np.zeros(n, bool)
        expected[np.argsort(v, kind="stable")[:j]] = True
        np.testing.assert_array_equal(np.asarray(fn(v, j)), expected, err_msg=f"j={j}")
