"""The rewrite pipeline: options, steps (`steps`), the summary (`report`) and `inspect` (`inspection`).

`onnx_rewriter.pipeline.rewrite`, `.Options`, `.STEPS` ... are `steps`' names, bound on first use so
that importing `pipeline.report` or `pipeline.inspection` does not load every step."""


def __getattr__(name):
    from onnx_rewriter.pipeline import steps

    try:
        return getattr(steps, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
