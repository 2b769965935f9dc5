"""What a folding pass did: folded pairs, BNs left in place with the reason, warnings, counts."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class FoldedPair:
    bn: str
    into: str
    direction: str        # "backward" (producer -> BN) or "forward" (BN -> consumer)
    producer_type: str
    bn_type: str = "BatchNorm"
    tensor: str = ""      # ONNX: the tensor at the fold site, same name in the unfolded and folded graph


@dataclass
class SkippedBN:
    bn: str
    reason: str


@dataclass
class FoldReport:
    folded: list[FoldedPair] = field(default_factory=list)
    skipped: list[SkippedBN] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    bn_before: int = 0
    bn_after: int = 0
    params_before: int = 0
    params_after: int = 0
    nodes_before: int = 0
    nodes_after: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FoldReport":
        d = dict(d)
        d["folded"] = [FoldedPair(**f) for f in d.get("folded", [])]
        d["skipped"] = [SkippedBN(**s) for s in d.get("skipped", [])]
        return cls(**d)

    def summary(self) -> str:
        return (f"folded {len(self.folded)} BN ({self.bn_before} -> {self.bn_after} left), "
                f"skipped {len(self.skipped)}, {len(self.warnings)} warning(s); "
                f"parameters {self.params_before} -> {self.params_after}")
