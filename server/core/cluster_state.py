"""The cluster state (``state.json`` in the run folder): what every worker serves, so that a worker started
later (a replacement for one that died) loads the same models and registers the same regions."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from foldserve.records import Record


@dataclass
class Region(Record):
    """A registered system shared-memory region."""

    key: str
    offset: int
    byte_size: int


@dataclass
class ClusterState(Record):
    VERSION_FIELD: ClassVar[str | None] = "format_version"

    gen: int = 0                                            # bumped by every committed change
    models: list[str] | None = None                         # None: what the repository has (the first start)
    loads: dict[str, int] = field(default_factory=dict)     # model -> the gen of its last (re)load
    shm: dict[str, Region] = field(default_factory=dict)
