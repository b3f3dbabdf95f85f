"""How a rewritten folder's logits are compared with an oracle's, and the pass rule per float type: shared
by the LLM (`llm`) and VLM (`vlm`) routes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FP32_REL = 1e-4
FP16_COSINE = 0.999
# fp16 top-1 may differ only where the oracle's own top-2 are closer than this share of its largest |logit|:
# a fixed tie, ~4x the relative logit error of correct fp16 runs (<= 2.3e-3 on the tiny families). A tie
# measured by the step's own error would switch the check off exactly when the graph is most wrong.
TOP1_TIE = 1e-2
# An FP8 KV cache must cost no more than this (logit cosine vs the model, every step): a scale that saturates
# or underflows the cache passes the tight check (the oracle rounds with the same scales) but fails here.
# Correct calibrated scales measured >= 0.9968 on the tiny families.
FP8_COSINE = 0.99


@dataclass
class StepResult:
    step: str
    max_abs: float
    rel: float
    cosine: float
    top1_agree: bool
    top1_checked: bool


@dataclass
class VerifyResult:
    steps: list[StepResult] = field(default_factory=list)
    criterion: str = ""
    passed: bool = False
    rope_table_difference: float | None = None
    rope_checks: list = field(default_factory=list)  # rope_check.RopeCheck per group of layers
    # INT4 / FP8-KV folders: the oracle above (dequantized weights, FP8 cache rounding) against the original
    # model, per step; `quantized` names what differs
    quantization: list[StepResult] = field(default_factory=list)
    reduced_vocab: tuple[int, int] | None = None  # (kept, full) for a --reduce-vocab folder
    quantized: str = "INT4"
    # W+A folders: our logits against the original (unquantized-activation) model, per step (wa_check.py)
    ours_vs_original: list[StepResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # consistency.py: the folder's files disagree
    # MoE plugin nodes: (node, E, experts some row was routed to over the run); a verify that used few proves little
    expert_usage: list = field(default_factory=list)
    routing_ties: str | None = None  # MoE: the routing near-ties the oracle followed (moe_routing.py), if any

    def quantization_line(self) -> str:
        q = self.quantization
        agree = sum(s.top1_agree for s in q)
        return (f"{self.quantized} quantization error (quantized oracle vs original model, same tokens): min cosine "
                f"{min(s.cosine for s in q):.6f}, mean cosine {np.mean([s.cosine for s in q]):.6f}, "
                f"top-1 agreement {agree}/{len(q)}")

    def table(self) -> str:
        rows = [f"{'step':<14}{'max_abs':>11}{'rel':>11}{'cosine':>11}  top1"]
        for s in self.steps:
            top = ("same" if s.top1_agree else "DIFF") + ("" if s.top1_checked else " (margin tiny)")
            if not np.isfinite([s.max_abs, s.cosine]).all():  # NaN logits: argmax of NaNs is no agreement
                top = "NaN"
            rows.append(f"{s.step:<14}{s.max_abs:>11.3e}{s.rel:>11.3e}{s.cosine:>11.6f}  {top}")
        return "\n".join(rows)


def compare(step: str, ours: np.ndarray, ref: np.ndarray) -> StepResult:
    err = np.abs(ours - ref)
    max_abs = float(err.max())
    rel = max_abs / max(float(np.abs(ref).max()), 1e-12)
    cos = float(np.dot(ours, ref) / max(np.linalg.norm(ours) * np.linalg.norm(ref), 1e-30))
    top2 = np.sort(ref)[-2:]
    margin = float(top2[1] - top2[0])
    tie = TOP1_TIE * max(float(np.abs(ref).max()), 1e-12)
    finite = bool(np.isfinite(ours).all() and np.isfinite(ref).all())  # argmax of NaNs is no agreement
    return StepResult(step, max_abs, rel, cos, finite and int(ours.argmax()) == int(ref.argmax()), margin > tie)


def judge(result: VerifyResult, float_type) -> None:
    """The pass rule for the folder's float type: fp32 exact to rounding, fp16 by cosine and top-1."""
    if float_type == np.float32:
        result.criterion = f"fp32: relative error <= {FP32_REL} and identical top-1 at every step"
        result.passed = all(s.rel <= FP32_REL and s.top1_agree for s in result.steps)
    else:
        result.criterion = (f"fp16: cosine >= {FP16_COSINE} and identical top-1 wherever the oracle's top-2 "
                            f"margin exceeds {TOP1_TIE:g} of its largest |logit|")
        result.passed = all(s.cosine >= FP16_COSINE and (s.top1_agree or not s.top1_checked) for s in result.steps)
