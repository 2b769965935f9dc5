"""The cluster state (``state.json`` in the run folder): what every worker serves, so that a worker started
later (a replacement for one that died) loads the same models and registers the same regions."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

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
    # model -> version -> SHA-256 of the bytes served: a replacement serves exactly these or does not join
    served: dict[str, dict[str, str]] | None = None
    log_settings: dict[str, Any] | None = None              # Triton's logging extension, as last set
    trace_settings: dict[str, Any] | None = None            # Triton's trace extension, as last set
    overrides: dict[str, str] = field(default_factory=dict)  # model -> the config override it was loaded with

    def pins(self) -> dict[str, dict[int, str]] | None:
        if self.served is None:
            return None
        return {m: {int(v): d for v, d in versions.items()} for m, versions in self.served.items()}

    def pin(self, served: dict[str, dict[int, str]], names: list[str] | None = None) -> None:
        """Record what is served now (of ``names`` only, the others as they were)."""
        current = dict(self.served or {})
        for name in names if names is not None else list(served):
            if name in served:
                current[name] = {str(v): d for v, d in served[name].items()}
            else:
                current.pop(name, None)
        self.served = current
