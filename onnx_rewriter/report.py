"""The match report: per layer, rewritten or not, by which patterns, and why not."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class LayerReport:
    index: int
    rewritten: bool
    patterns: list[str]
    reason: str | None  # first failed check and the node it failed at


@dataclass
class Report:
    layers: list[LayerReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def table(self) -> str:
        rows = [f"{'layer':>5}  {'status':<9} detail"]
        for l in self.layers:
            detail = ", ".join(l.patterns) if l.rewritten else l.reason
            rows.append(f"{l.index:>5}  {'rewritten' if l.rewritten else 'REFUSED':<9} {detail}")
        return "\n".join(rows)
