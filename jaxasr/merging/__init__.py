"""Model merging over parameter trees: task vectors, and methods that combine them into one delta.

    deltas = task_vectors(experts, base)
    delta = merge_deltas("tsv_m", deltas)            # or "ties", density=0.2 ...
    params = apply_delta(base, delta, alpha=1.0)     # or merge("tsv_m", base, experts, alpha=...)

Methods (`METHODS`): soup, task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs,
breadcrumbs_ties, sce, model_stock, karcher, multislerp, pcb, tsv_m, boosted_tsv_m, iso_c, iso_cts.
"""

from jaxasr.merging.methods import DEFAULT_MAX_GROUP_BYTES, METHODS, merge, merge_deltas
from jaxasr.merging.task_vectors import apply_delta, leaf_paths, shape_groups, task_vector, task_vectors

__all__ = [
    "DEFAULT_MAX_GROUP_BYTES",
    "METHODS",
    "apply_delta",
    "leaf_paths",
    "merge",
    "merge_deltas",
    "shape_groups",
    "task_vector",
    "task_vectors",
]
