"""Per-epoch permutation shuffling (jaxasr.data.shuffle)."""

from __future__ import annotations

import grain
import numpy as np

from jaxasr.data import shuffle as S


def _order(ds: grain.MapDataset, epochs: int, n: int) -> list[list[int]]:
    """`epochs` epochs of n elements of a repeated dataset."""
    return [[ds[e * n + i] for i in range(n)] for e in range(epochs)]


def test_every_epoch_is_a_new_permutation_of_the_data():
    base = grain.MapDataset.range(50)
    epochs = _order(S.shuffle(base, seed=3).repeat(None), 3, 50)
    for order in epochs:
        assert sorted(order) == list(range(50))
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(50))


def test_same_seed_same_order_and_epochs_read_in_any_order():
    a = S.shuffle(grain.MapDataset.range(30), seed=7).repeat(None)
    b = S.shuffle(grain.MapDataset.range(30), seed=7).repeat(None)
    c = S.shuffle(grain.MapDataset.range(30), seed=8).repeat(None)
    assert _order(a, 2, 30) == _order(b, 2, 30) != _order(c, 2, 30)
    # jumping between epochs (a restored iterator, several processes) gives the same elements
    order = _order(a, 4, 30)
    assert [b[95], b[3], b[61], b[3]] == [order[3][5], order[0][3], order[2][1], a[3]]


def test_large_datasets_use_grains_shuffle(monkeypatch):
    monkeypatch.setattr(S, "MAX_STORED", 10)
    ds = S.shuffle(grain.MapDataset.range(20), seed=1)
    assert not isinstance(ds, S.PermutationShuffle)
    assert sorted(ds[i] for i in range(20)) == list(range(20))
    assert isinstance(S.shuffle(grain.MapDataset.range(10), seed=1), S.PermutationShuffle)
