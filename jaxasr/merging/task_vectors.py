"""Task vectors over parameter trees, and the shape groups that merging runs on.

A parameter tree is any pytree of arrays: the nested dict of `nnx.to_pure_dict(state)`, or a flat
`{path: array}` dict. A task vector is `expert - base`, leaf by leaf (Ilharco et al., "Editing Models
with Task Arithmetic", arXiv 2212.04089). Merging methods turn several task vectors into one delta,
and the merged model is `base + alpha * delta`.

Merging is done one group of equal-shape leaves at a time (`shape_groups`), so that the per-weight
SVDs are batched (one vmapped call per shape) while the device only ever holds one group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

Tree = Any


def _leaves(tree: Tree) -> tuple[list[Any], Any]:
    return jax.tree_util.tree_flatten(tree)


def leaf_paths(tree: Tree) -> list[str]:
    """Readable paths of the leaves of `tree`, in `jax.tree_util` flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [jax.tree_util.keystr(path) for path, _ in flat]


def check_same_structure(trees: Sequence[Tree], names: Sequence[str] | None = None) -> None:
    """Raise ValueError unless all trees have the same structure and leaf shapes."""
    if not trees:
        raise ValueError("no parameter trees given")
    names = list(names) if names is not None else [f"tree {i}" for i in range(len(trees))]
    leaves0, treedef0 = _leaves(trees[0])
    paths = leaf_paths(trees[0])
    for name, tree in zip(names[1:], trees[1:]):
        leaves, treedef = _leaves(tree)
        if treedef != treedef0:
            raise ValueError(f"{name} does not have the structure of {names[0]}: "
                             f"{sorted(set(leaf_paths(tree)) ^ set(paths))[:5]} differ")
        for path, a, b in zip(paths, leaves0, leaves):
            if np.shape(a) != np.shape(b):
                raise ValueError(f"{path}: shape {np.shape(b)} in {name}, {np.shape(a)} in {names[0]}")


def task_vector(expert: Tree, base: Tree) -> Tree:
    """`expert - base`, leaf by leaf, in float32 (on the host: a task vector is merging input)."""
    check_same_structure([base, expert], ["base", "expert"])
    return jax.tree_util.tree_map(lambda e, b: np.asarray(e, np.float32) - np.asarray(b, np.float32),
                                  expert, base)


def task_vectors(experts: Sequence[Tree], base: Tree) -> list[Tree]:
    """One task vector per expert."""
    return [task_vector(e, base) for e in experts]


def apply_delta(base: Tree, delta: Tree, alpha: float = 1.0) -> Tree:
    """`base + alpha * delta`, leaf by leaf, keeping each base leaf's dtype."""
    check_same_structure([base, delta], ["base", "delta"])

    def add(b, d):
        b = np.asarray(b)
        return (b.astype(np.float32) + np.float32(alpha) * np.asarray(d, np.float32)).astype(b.dtype)

    return jax.tree_util.tree_map(add, base, delta)


def shape_groups(shapes: Sequence[tuple[int, ...]], bytes_per_leaf: Sequence[int],
                 max_group_bytes: int) -> list[list[int]]:
    """Leaf indices grouped by shape, each group holding at most `max_group_bytes` of input.

    `bytes_per_leaf[i]` is what leaf i costs once stacked (all tasks, float32). A leaf larger than
    the budget still gets a group of its own. Groups keep the leaves' original order inside.
    """
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, shape in enumerate(shapes):
        by_shape.setdefault(tuple(shape), []).append(i)
    groups = []
    for indices in by_shape.values():
        per_leaf = max(1, int(bytes_per_leaf[indices[0]]))
        size = max(1, int(max_group_bytes) // per_leaf)
        groups += [indices[i:i + size] for i in range(0, len(indices), size)]
    return groups
