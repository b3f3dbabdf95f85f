"""The rewrite pipeline: options and steps (`steps`), the summary (`report`) and `inspect` (`inspection`).

The API names are `steps`' (monkeypatch those in `steps`, where the pipeline looks them up)."""

from onnx_rewriter.pipeline.steps import STEPS, Options, Run, make_options, rewrite

__all__ = ["STEPS", "Options", "Run", "make_options", "rewrite"]
