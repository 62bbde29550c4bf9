"""Small random parameter trees shared by the merging tests (CPU, a few KB each)."""

from __future__ import annotations

import numpy as np
import pytest

SHAPES = {"enc": {"w1": (64, 48), "w2": (64, 48), "b": (48,)}, "proj": (48, 64), "conv": (3, 8, 6)}
# Element-wise methods do not care about matrix orientation: fewer shapes, fewer compilations.
SMALL_SHAPES = {"enc": {"w1": (64, 48), "w2": (64, 48), "b": (48,)}}


def random_tree(rng: np.random.Generator, scale: float = 1.0, shapes=SHAPES):
    if isinstance(shapes, dict):
        return {k: random_tree(rng, scale, v) for k, v in shapes.items()}
    return (scale * rng.standard_normal(shapes)).astype(np.float32)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def make_base_and_experts(rng, shapes=SHAPES, num_tasks=3):
    """A base and experts = base + task vectors of a tenth of the base's scale."""
    base = random_tree(rng, 1.0, shapes)
    experts = []
    for _ in range(num_tasks):
        tv = random_tree(rng, 0.1, shapes)
        experts.append({k: _add(base[k], tv[k]) for k in base})
    return base, experts


@pytest.fixture
def base_and_experts(rng):
    return make_base_and_experts(rng, SMALL_SHAPES)


def _add(a, b):
    if isinstance(a, dict):
        return {k: _add(a[k], b[k]) for k in a}
    return (a + b).astype(np.float32)


def leaves(tree, prefix=""):
    """{path: array} of a nested dict, for per-weight comparisons."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(leaves(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out
