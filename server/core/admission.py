"""Admission control for inference, shared by both transports: requests being handled at once on a
transport, against a limit; past it a request is answered at once (RESOURCE_EXHAUSTED / 429) instead of
queueing without bound.

A slot is taken only when the request is complete (the body read, the message received) and authenticated,
so clients that open calls and send nothing, or send slowly, never hold one; health, liveness and metadata
never take one.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from foldserve.errors import QueueFull


@dataclass
class Admission:
    limit: int
    active: int = 0

    @contextmanager
    def slot(self) -> Iterator[None]:
        if self.active >= self.limit:
            raise QueueFull(f"server busy: {self.active} requests in flight (limit {self.limit}); retry later")
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
