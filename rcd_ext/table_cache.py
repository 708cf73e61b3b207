"""Values computed from an embedding table (a full read of it), kept while the table is unchanged.

A `TableCache` entry is keyed on the table's device, data_ptr, shape, strides, dtype and a
caller's extra key, and is used only while the same storage is alive and the tensor's version
counter (bumped by every in-place change, through views too) is unchanged. Changes that bypass
the counter (`.data`) are not seen: call `clear()` after them. Inference tensors track no
version, so their values are computed on every call (`get` says so).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import torch

Value = TypeVar("Value")


class TableCache(Generic[Value]):
    """The last `size` values of `compute(table)`, least recently used dropped first."""

    def __init__(self, size: int) -> None:
        self.size = size
        # key -> (weakref to the table's storage, its version counter, value)
        self._entries: OrderedDict[tuple, tuple[weakref.ref, int, Value]] = OrderedDict()

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, table: torch.Tensor, extra: Hashable,
            compute: Callable[[torch.Tensor], Value]) -> tuple[Value, bool]:
        """(value, whether it could be cached): cached, or `compute(table)` now."""
        if table.is_inference():  # no version counter (and `.detach()` would hide that)
            return compute(table), False
        table = table.detach()  # shares the version counter and the storage
        version = table._version
        storage = table.untyped_storage()
        key = (table.device, table.data_ptr(), tuple(table.shape), table.stride(), table.dtype,
               extra)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is storage and entry[1] == version:
            self._entries.move_to_end(key)
            return entry[2], True
        value = compute(table)
        self._entries[key] = (weakref.ref(storage), version, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value, True
