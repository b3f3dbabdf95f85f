"""onnx_rewriter: plain ONNX exports of HF decoder LLMs -> NVIDIA EdgeLLM (AttentionPlugin, KV cache).

Python API mirroring the CLI:
    onnx_rewriter.rewrite("base.onnx", "out", target="edgellm-0.9", dtype="float16")
    onnx_rewriter.export(model="path/or/id", output_dir="out")
    onnx_rewriter.verify("out", model="path/or/id")
"""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())


# Each bound at first call: `import onnx_rewriter` stays light (the CLI's --help, the tokenizer child).
def rewrite(in_path, out_dir, **options):
    from onnx_rewriter.pipeline.steps import rewrite as _rewrite

    return _rewrite(in_path, out_dir, **options)


def export(model, output_dir, **options):
    from .hf.export import export as _export

    return _export(model, output_dir, **options)


def verify(out_dir, **options):
    from onnx_rewriter.verification.llm import verify as _verify

    return _verify(out_dir, **options)
