"""Exact per-batch mixing of data components (pure logic; the pipeline wires it into Grain).

Every batch holds exactly the same number of rows from each component, so a mixing weight is a
property of each batch rather than of the long-run average; only the row order changes per batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

PAPER_COMPONENTS = ("source_audio", "source_text", "target_audio", "target_text")
# Remainders closer than this count as tied, so float noise (0.3 * 20 = 6.000000000000001)
# cannot override the tie-break by name.
_TIE_EPS = 1e-9


def exact_counts(weights: Mapping[str, float], batch_size: int) -> dict[str, int]:
    """Rows per component in a batch of `batch_size`, proportional to `weights`, summing exactly.

    Largest-remainder method: each component gets floor(share * batch_size), and the rows left go
    to the largest remainders, ties broken by name. Weights are normalized. A positive weight whose
    count comes out 0 is an error (the batch is too small to hold that share).
    """
    if not weights:
        raise ValueError("no mixture components given")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    batch_size = int(batch_size)
    for name, w in weights.items():
        if not math.isfinite(w) or w <= 0:
            raise ValueError(f"mixture component {name!r} has weight {w}; weights must be positive and finite "
                             "(drop a component instead of giving it zero weight)")
    total = math.fsum(weights.values())
    quota = {name: w / total * batch_size for name, w in weights.items()}
    counts = {name: int(math.floor(q + _TIE_EPS)) for name, q in quota.items()}
    left = batch_size - sum(counts.values())
    by_remainder = sorted(quota, key=lambda n: (-round(quota[n] - counts[n], 9), n))
    for name in by_remainder[:left]:
        counts[name] += 1
    for name, c in counts.items():
        if c == 0:
            raise ValueError(f"batch_size={batch_size} is too small for mixture component {name!r}: its share "
                             f"{weights[name] / total:.4g} gives {quota[name]:.3g} rows, which rounds to 0")
    return counts


def paper_mixture(p: float, target_share: float = 0.5) -> dict[str, float]:
    """Shares of the mixed-batch recipe: a fraction `p` of each domain is audio, the rest text.

    source_audio=(1-t)p, source_text=(1-t)(1-p), target_audio=tp, target_text=t(1-p) with
    t=target_share (p/2 and (1-p)/2 for t=0.5). Components with zero share are left out.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p (the audio fraction within each domain) must be in [0, 1], got {p}")
    if not 0.0 <= target_share <= 1.0:
        raise ValueError(f"target_share must be in [0, 1], got {target_share}")
    t = target_share
    shares = dict(zip(PAPER_COMPONENTS, ((1 - t) * p, (1 - t) * (1 - p), t * p, t * (1 - p))))
    return {name: s for name, s in shares.items() if s > 0}


def batch_plan(counts: Mapping[str, int], batch_index: int, seed: int) -> list[str]:
    """The component of each row of batch `batch_index`: the exact counts, shuffled.

    The permutation is seeded by (seed, batch_index), so any batch can be rebuilt on its own (after
    a restore from checkpoint, or on another host) without replaying earlier batches.
    """
    for name, c in counts.items():
        if isinstance(c, bool) or int(c) != c or c < 0:
            raise ValueError(f"count for mixture component {name!r} must be a non-negative integer, got {c!r}")
    if batch_index < 0 or seed < 0:
        raise ValueError(f"batch_index and seed must be non-negative, got {batch_index} and {seed}")
    # Sorted names: the plan must not depend on the mapping's insertion order.
    rows = [name for name in sorted(counts) for _ in range(int(counts[name]))]
    order = np.random.default_rng([int(seed), int(batch_index)]).permutation(len(rows))
    return [rows[i] for i in order]
