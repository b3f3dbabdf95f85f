"""The match report: per layer, rewritten or not, by which patterns, and why not.

A refused run keeps its report too (`error` says why), so `--report` and the table show which layer
failed and at which check and node.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class LayerReport:
    index: int
    rewritten: bool
    patterns: list[str]
    reason: str | None  # first failed check and the node it failed at
    qkv_unfused: str | None = None  # why q/k/v stayed three MatMuls (projections.fuse_qkv), when it was tried


@dataclass
class Report:
    layers: list[LayerReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    snapped: list[str] = field(default_factory=list)  # exact values written in place of rounded graph constants
    seconds: float = 0.0
    error: str | None = None  # the refusal, when the run was refused
    features: dict = field(default_factory=dict)  # per feature (features/): what it changed and what it left

    @property
    def refused(self) -> bool:
        return self.error is not None

    def to_json(self) -> str:
        d = asdict(self)
        d["status"] = "refused" if self.refused else "rewritten"
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    def table(self) -> str:
        rows = [f"{'layer':>5}  {'status':<9} detail"]
        for l in self.layers:
            detail = ", ".join(l.patterns) if l.rewritten else l.reason
            # A refused run rewrites nothing: say "matched" for layers that were understood.
            status = ("matched" if self.refused else "rewritten") if l.rewritten else "REFUSED"
            rows.append(f"{l.index:>5}  {status:<9} {detail}")
        return "\n".join(rows)
