"""A serving process keeps what it started with out of the collector's walks (server/core/heap.py), without
keeping forever what a reload or an unload let go."""
from __future__ import annotations

import gc
import weakref

from server.core import heap


class Node:
    def __init__(self) -> None:
        self.me = self                  # a reference cycle: only the cyclic collector frees it


def test_a_settled_heap_is_skipped_until_resettled_and_then_freed(monkeypatch):
    monkeypatch.setattr(heap, "_managed", True)
    try:
        node = Node()
        ref = weakref.ref(node)
        assert heap.settle() >= 1 and gc.get_freeze_count() >= 1
        del node
        gc.collect()
        assert ref() is not None        # frozen: no collection looks at it (what keeps the p99 short)
        heap.resettle()                 # after a version drained: everything is looked at again
        assert ref() is None
    finally:
        gc.unfreeze()


def test_a_library_user_s_heap_is_left_alone(monkeypatch):
    monkeypatch.setattr(heap, "_managed", False)
    before = gc.get_freeze_count()
    node = Node()
    assert heap.settle() == before and heap.resettle() == before
    ref = weakref.ref(node)
    del node
    gc.collect()
    assert ref() is None
