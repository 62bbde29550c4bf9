"""Ours against mergekit's own tensor-level merge methods, weight by weight, fp32."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mergekit")
from mergekit.merge_methods import registry  # noqa: E402
from mergekit.merge_methods.base import TensorGroup  # noqa: E402

import jax  # noqa: E402

from jaxasr.merging import merge  # noqa: E402
from tests.merging.conftest import leaves  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
WEIGHTS = (1.0, 0.5, 2.0)


def mergekit_merge(name, base, experts, params, with_base=True):
    """mergekit's result for every weight: `registry.get(name)` run on one TensorGroup per weight."""
    method = registry.get(name)
    out = {}
    for path, b in leaves(base).items():
        xs = [torch.from_numpy(leaves(e)[path].copy()) for e in experts]
        if with_base:
            group = TensorGroup.from_tensors([torch.from_numpy(b.copy()), *xs], base_index=0)
            ids = range(1, len(xs) + 1)
        else:
            group = TensorGroup.from_tensors(xs)
            ids = range(len(xs))
        bound = {k: (dict(zip(ids, v)) if isinstance(v, tuple) else v) for k, v in params.items()}
        out[path] = method([group], parameters=bound)[0].numpy()
    return out


def assert_all_close(ours, theirs, **tol):
    ours = leaves(ours)
    assert ours.keys() == theirs.keys()
    for path in ours:
        np.testing.assert_allclose(ours[path], theirs[path], err_msg=path, **(tol or TOL))


def per_task(v, n=3):
    return tuple([v] * n)


CASES = [
    # (ours, our params, mergekit name, mergekit params, mergekit sees the base)
    ("soup", {"weights": WEIGHTS}, "linear", {"weight": WEIGHTS}, False),
    ("task_arithmetic", {"weights": WEIGHTS}, "task_arithmetic", {"weight": WEIGHTS}, True),
    ("ties", {"weights": WEIGHTS, "density": 0.3}, "ties", {"weight": WEIGHTS, "density": per_task(0.3)}, True),
    ("ties", {"weights": WEIGHTS, "density": (0.2, 0.5, 0.9)}, "ties",
     {"weight": WEIGHTS, "density": (0.2, 0.5, 0.9)}, True),
    ("breadcrumbs", {"weights": WEIGHTS, "density": 0.5, "gamma": 0.05}, "breadcrumbs",
     {"weight": WEIGHTS, "density": per_task(0.5), "gamma": per_task(0.05)}, True),
    ("breadcrumbs_ties", {"weights": WEIGHTS, "density": 0.5}, "breadcrumbs_ties",
     {"weight": WEIGHTS, "density": per_task(0.5)}, True),
    ("sce", {}, "sce", {}, True),
    ("sce", {"select_topk": 0.3}, "sce", {"select_topk": 0.3}, True),
    ("model_stock", {}, "model_stock", {}, True),
    ("model_stock", {"filter_wise": True}, "model_stock", {"filter_wise": True}, True),
    ("karcher", {}, "karcher", {}, False),
    ("multislerp", {"weights": WEIGHTS}, "multislerp", {"weight": WEIGHTS}, True),
]


@pytest.mark.parametrize("ours,params,theirs,their_params,with_base", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_matches_mergekit(base_and_experts, ours, params, theirs, their_params, with_base):
    base, experts = base_and_experts
    expected = mergekit_merge(theirs, base, experts, their_params, with_base)
    assert_all_close(merge(ours, base, experts, **params), expected)


def test_ties_lambda_is_alpha(base_and_experts):
    base, experts = base_and_experts
    expected = mergekit_merge("ties", base, experts, {"weight": WEIGHTS, "density": per_task(0.3), "lambda": 0.7})
    assert_all_close(merge("ties", base, experts, alpha=0.7, weights=WEIGHTS, density=0.3), expected)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_matches_mergekit_given_our_masks(base_and_experts, monkeypatch, name):
    """DARE's masks are random in both; read ours back (one-hot weights leave task i's rescaled,
    masked delta, whose nonzeros are its mask) and make mergekit's Bernoulli draw return them."""
    base, experts = base_and_experts
    key = jax.random.key(7)
    density = 0.4
    masks = {path: [] for path in leaves(base)}
    for i in range(3):
        onehot = tuple(float(i == j) for j in range(3))
        delta = leaves(merge("dare_linear", base, experts, key=key, weights=onehot, density=density))
        for path, b in leaves(base).items():
            masks[path].append(((delta[path] - b) != 0).astype(np.float32))
    kept = np.mean([m.mean() for ms in masks.values() for m in ms])
    assert abs(kept - density) < 0.05  # the masks read back are DARE masks, not all-ones

    ours = leaves(merge(name, base, experts, key=key, weights=WEIGHTS, density=density))
    for path in ours:
        queue = [torch.from_numpy(m) for m in masks[path]]
        monkeypatch.setattr(torch, "bernoulli", lambda probs, *a, **k: queue.pop(0))
        theirs = mergekit_merge(name, {path: base_leaf(base, path)},
                                [{path: leaves(e)[path]} for e in experts],
                                {"weight": WEIGHTS, "density": per_task(density)})[path]
        assert not queue  # mergekit drew exactly one mask per task
        np.testing.assert_allclose(ours[path], theirs, err_msg=path, **TOL)


def base_leaf(tree, path):
    return leaves(tree)[path]
