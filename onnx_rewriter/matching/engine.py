"""The pattern engine: runs the pattern library stage by stage and keeps every match and every miss.

A pattern (one file in `patterns/`) declares a `stage`, the `anchors` it starts from (op types), and a
`match(node, ctx)` that returns the tensor its match computes plus a result (a `matching/results.py` dataclass),
or raises `Reject` with a reason (`Refuse`: the model cannot run at all; both from `matching/api.py`).
Later stages look earlier results up by tensor (`ctx.lookup`), so small matches (RoPE, repeat_kv, the
attention core) feed the layer-level match. The engine knows no pattern by name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import onnx_graphsurgeon as gs

from onnx_rewriter.matching import Refuse, Reject

__all__ = ["Context", "Match", "Miss", "Pattern", "Refuse", "Reject", "run"]  # Refuse: for callers of run()

log = logging.getLogger(__name__)


class Pattern(Protocol):
    name: str
    stage: str
    anchors: tuple[str, ...]

    def match(self, node: gs.Node, ctx: Context) -> tuple[gs.Tensor, Any]: ...


@dataclass
class Match:
    pattern: str
    anchor: gs.Node
    out: gs.Tensor
    result: Any


@dataclass
class Miss:
    anchor: gs.Node
    pattern: str
    reject: Reject

    def describe(self) -> str:
        return f"{self.pattern}: {self.reject.reason}{self.reject.where()}"


@dataclass
class Context:
    graph: gs.Graph
    info: dict = field(default_factory=dict)  # facts shared with patterns (e.g. opset)
    matches: dict[str, dict[str, Match]] = field(default_factory=dict)  # stage -> out tensor -> match
    by_anchor: dict[str, dict[str, Match]] = field(default_factory=dict)  # stage -> anchor node -> match
    misses: dict[str, dict[str, list[Miss]]] = field(default_factory=dict)  # stage -> anchor -> misses

    def lookup(self, stage: str | Iterable[str], tensor: gs.Tensor) -> Match | None:
        stages = (stage,) if isinstance(stage, str) else stage
        for s in stages:
            m = self.matches.get(s, {}).get(tensor.name)
            if m is not None:
                return m
        return None

    def why_not(self, stage: str | Iterable[str], tensor: gs.Tensor) -> str:
        """The reasons the producer of `tensor` did not match in `stage` (for a parent's message)."""
        stages = (stage,) if isinstance(stage, str) else stage
        node = tensor.inputs[0] if tensor.inputs else None
        if node is None:
            return "it is a graph input or constant"
        for s in stages:
            misses = self.misses.get(s, {}).get(node.name)
            if misses:
                return "; ".join(m.describe() for m in misses)
        return f"its producer {node.op} '{node.name}' is not one a pattern starts from"

    def anchor_match(self, stage: str, node: gs.Node) -> Match | None:
        return self.by_anchor.get(stage, {}).get(node.name)

    def anchor_misses(self, stage: str, node: gs.Node) -> list[Miss]:
        return self.misses.get(stage, {}).get(node.name, [])


def run(graph: gs.Graph, stages: list[str], patterns: list[Pattern], info: dict | None = None) -> Context:
    """Match every stage in order. A `Refuse` propagates (the model cannot run); a `Reject` is kept."""
    ctx = Context(graph=graph, info=dict(info or {}))
    for stage in stages:
        ctx.matches[stage], ctx.by_anchor[stage], ctx.misses[stage] = {}, {}, {}
        stage_patterns = [p for p in patterns if p.stage == stage]
        for node in list(graph.nodes):
            for pat in (p for p in stage_patterns if node.op in p.anchors):
                try:
                    out, result = pat.match(node, ctx)
                except Refuse:
                    raise
                except Reject as rej:
                    ctx.misses[stage].setdefault(node.name, []).append(Miss(node, pat.name, rej))
                    continue
                m = Match(pat.name, node, out, result)
                ctx.matches[stage][out.name] = m
                ctx.by_anchor[stage][node.name] = m
                ctx.misses[stage].pop(node.name, None)
                break
        log.debug("stage %s: %d matches", stage, len(ctx.matches[stage]))
    return ctx
