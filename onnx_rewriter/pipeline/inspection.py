"""`inspect`: what the rewriter sees in a graph, without writing anything.

Runs the pipeline's own steps (load, normalize, match, embedding, check) and stops before build and
write, so what it prints is exactly what a rewrite would decide. A refusal is part of the answer, not
an error: the text says which layer and which check. Only an unreadable input raises.
"""

from __future__ import annotations

from pathlib import Path

from onnx_rewriter import targets
from onnx_rewriter.errors import RewriteError
from onnx_rewriter.pipeline import steps as pipeline

# (spec key, label) in the order printed.
_FIELDS = [
    ("num_hidden_layers", "layers"), ("num_attention_heads", "q heads"), ("num_key_value_heads", "kv heads"),
    ("head_dim", "head size"), ("rotary_dim", "rotary dims"), ("rope_theta", "rope theta"),
    ("default_rope", "plain RoPE (no scaling)"), ("sliding_window", "sliding window"),
    ("vocab_size", "vocab"), ("hidden_size", "hidden size"),
]


def analyze(path, target: str | None = None, config=None) -> pipeline.Run:
    """The run after every step but build and write; `run.report.error` holds a refusal, if any."""
    options = pipeline.make_options(target=target or targets.DEFAULT, config=config)
    run = pipeline.Run(in_path=Path(path), out_dir=None, options=options)
    run.warn = run.report.warnings.append  # render() prints them once, in the answer (no log line too)
    pipeline.step_load(run)  # an unreadable input is an error, not a report
    try:
        pipeline.step_normalize(run)
        try:
            pipeline.step_match(run)
        except RewriteError as exc:
            run.report.error = str(exc)
            if not run.layers:
                return run
        # Partly matched graphs still get dimensions from the layers that did match.
        pipeline.step_embedding(run)
        if run.report.error is None:
            pipeline.step_check(run)
    except RewriteError as exc:
        run.report.error = run.report.error or str(exc)
    return run


def render(run: pipeline.Run) -> str:
    lines = [f"input: {run.in_path} (opset {run.source.opset}, {len(run.source.graph.nodes)} nodes)",
             f"target: {run.options.target} (runtime {run.options.target.releases})"]
    spec = dict(run.spec)
    if spec:
        spec["num_hidden_layers"] = len(run.report.layers) or spec.get("num_hidden_layers")
        lines.append("config read off the graph:")
        show = lambda v: ("yes" if v else "no") if isinstance(v, bool) else v
        lines += [f"  {label:<24}{show(spec[key])}" for key, label in _FIELDS if spec.get(key) is not None]
        if spec.get("mrope_section"):
            kind = "interleaved" if spec.get("mrope_interleaved") else "sectioned"
            lines.append(f"  {'M-RoPE sections (t,h,w)':<24}{spec['mrope_section']} {kind}")
        if "sliding_window" not in spec and run.layers and run.options.self_check and run.report.error is None:
            lines.append(f"  {'sliding window':<24}none (causal)")
    if run.report.layers:
        lines.append("layers:")
        lines += ["  " + row for row in run.report.table().splitlines()]
    for w in run.report.warnings:
        lines.append(f"warning: {w}")
    if run.report.error:
        lines.append(f"verdict: would NOT rewrite: {' '.join(run.report.error.split())}")
    else:
        lines.append(f"verdict: would rewrite all {len(run.layers)} layers for {run.options.target}")
    return "\n".join(lines)


def inspect(path, target: str | None = None, config=None) -> str:
    return render(analyze(path, target=target, config=config))
