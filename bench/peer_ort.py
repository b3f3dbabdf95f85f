"""Peer tool for the rewrite benchmark: onnxscript's `optimize_for_ort` on a baseline ONNX file.

    python bench/peer_ort.py base/model.onnx out_dir

Loads with onnx_ir (weights stay lazy on disk), fuses, saves with external data. Prints one JSON line:
the fusion counts onnxscript reports and the fused attention nodes found in the output.
"""

from __future__ import annotations

import collections
import json
import os
import sys

ATTENTION_OPS = {"MultiHeadAttention", "GroupQueryAttention", "Attention", "PackedMultiHeadAttention"}


def main(src: str, out_dir: str) -> int:
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(src)
    model, counts = optimize_for_ort(model)
    os.makedirs(out_dir, exist_ok=True)
    ir.save(model, os.path.join(out_dir, "model.onnx"), external_data="model.onnx.data")
    ops = collections.Counter(n.op_type for n in model.graph if n.domain in ("com.microsoft", "", "ai.onnx"))
    print(json.dumps({"fusions": {k: v for k, v in counts.items() if v},
                      "attention_nodes": sum(ops[o] for o in ATTENTION_OPS)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
