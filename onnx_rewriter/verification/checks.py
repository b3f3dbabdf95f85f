"""verify's options, checked before any model is loaded: a typo fails in a second, not after the oracle."""

from __future__ import annotations

from pathlib import Path

from onnx_rewriter.errors import RewriteError
from onnx_rewriter.modelio.graph import check_plain_export

# The reference runs positions up to its RoPE table (runner.Session.max_positions = 512); the longest
# prompt is 11 tokens and the prefill holds one more.
MAX_STEPS = 512 - 11 - 1


def check_steps(steps) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise RewriteError(f"--steps {steps}: give a whole number from 1 to {MAX_STEPS} (the reference's "
                           f"cache holds 512 positions)")


def check_baseline(path) -> None:
    """--baseline is a plain export computing logits from input_ids, not a rewritten folder's graph."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise RewriteError(f"baseline '{path}' does not exist; give the .onnx file the folder was rewritten from")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:
        raise RewriteError(f"baseline '{path}' is not a readable ONNX file ({type(exc).__name__}); give the .onnx "
                           f"file the folder was rewritten from") from None
    check_plain_export(model, p)
    names = [i.name for i in model.graph.input]
    first = model.graph.output[0] if model.graph.output else None
    rank = len(first.type.tensor_type.shape.dim) if first is not None else 0
    if "input_ids" not in names or first is None or first.name != "logits" and rank != 3:
        what = f"'{first.name}' (rank {rank})" if first is not None else "nothing"
        raise RewriteError(f"baseline '{path}' is not a logits model (inputs {names}, first output {what}); give "
                           f"the plain export the folder was rewritten from (input_ids -> logits [batch, seq, vocab])")
