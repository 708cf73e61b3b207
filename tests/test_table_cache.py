"""`rcd_ext.table_cache.TableCache`: a value computed from a table is reused only while that very
table is unchanged, and `ops.table_mean` (the sparse residual's tail) follows in-place edits."""

from __future__ import annotations

import pytest
import torch

from rcd_ext import ops
from rcd_ext.table_cache import TableCache


def counting_sum():
    calls = []

    def compute(table):
        calls.append(1)
        return float(table.sum())

    return compute, calls


def test_reused_while_unchanged_recomputed_after_an_in_place_change():
    cache, (compute, calls) = TableCache(4), counting_sum()
    table = torch.ones(5, 3)
    assert cache.get(table, "k", compute) == (15.0, True)
    assert cache.get(table, "k", compute) == (15.0, True)
    assert len(calls) == 1
    table[1:2].mul_(3)  # through a view: the shared version counter moves
    assert cache.get(table, "k", compute) == (21.0, True)
    assert len(calls) == 2


def test_extra_key_shape_and_dtype_keep_entries_apart():
    cache, (compute, calls) = TableCache(8), counting_sum()
    table = torch.ones(4, 2)
    cache.get(table, 1, compute)
    cache.get(table, 2, compute)
    cache.get(table[:2], 1, compute)  # same data_ptr, other shape
    cache.get(table.double(), 1, compute)
    assert len(calls) == 4 and len(cache) == 4


def test_least_recently_used_entry_is_dropped_at_the_size():
    cache, (compute, calls) = TableCache(2), counting_sum()
    tables = [torch.full((2, 2), float(i)) for i in range(3)]
    for table in tables:
        cache.get(table, None, compute)
    assert len(cache) == 2
    cache.get(tables[0], None, compute)  # dropped: computed again
    assert len(calls) == 4


def test_inference_tensors_are_never_cached():
    cache, (compute, calls) = TableCache(4), counting_sum()
    with torch.inference_mode():
        table = torch.ones(3, 3)
    assert cache.get(table, None, compute) == (9.0, False)
    with torch.inference_mode():
        table.mul_(2)  # no version counter would see this
    assert cache.get(table, None, compute) == (18.0, False)
    assert len(calls) == 2 and len(cache) == 0


def test_table_mean_of_an_inference_table_warns_and_follows_changes():
    with torch.inference_mode():
        table = torch.randn(50, 4)
    with pytest.warns(UserWarning, match="inference tensor"):
        first = ops.table_mean(table, 50)
    torch.testing.assert_close(first, table.double().mean(0).float())
    with torch.inference_mode():
        table.add_(1.0)
    with pytest.warns(UserWarning, match="inference tensor"):
        second = ops.table_mean(table, 50)
    torch.testing.assert_close(second, table.double().mean(0).float())
