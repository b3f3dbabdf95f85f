"""Baseline exports that carry their own KV cache (Optimum style), for the coverage tests.

forward(input_ids, attention_mask, past_key_values.N.key/value...) -> logits, present.N.key/value:
the HF model runs with a DynamicCache built from the past inputs, so the graph holds
`present = Concat(past, new, axis=-2)` and a mask / positions computed from the past length.
"""

from __future__ import annotations

import warnings
from pathlib import Path


def export_with_cache(model, config, path: Path, exporter: str = "dynamo") -> Path:
    import torch
    from transformers import DynamicCache

    class WithCache(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, past):
            cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)])
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
            return (out.logits, *[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)])

    layers, hkv = config.num_hidden_layers, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    b, s, p = 2, 3, 5
    ids = torch.ones((b, s), dtype=torch.int64)
    mask = torch.ones((b, p + s), dtype=torch.int64)
    past = tuple(torch.randn(b, hkv, p, d) for _ in range(2 * layers))
    kv = [f"{i}.{x}" for i in range(layers) for x in ("key", "value")]
    names = dict(input_names=["input_ids", "attention_mask"] + [f"past_key_values.{n}" for n in kv],
                 output_names=["logits"] + [f"present.{n}" for n in kv])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            # Shared named dims; the mask length (past + seq) gets its own symbol: export.Dim cannot add two dims.
            batch = torch.export.Dim("batch", min=1, max=1024)
            seq, plen = torch.export.Dim("seq", min=1, max=4096), torch.export.Dim("past", min=1, max=4096)
            shapes = {"input_ids": {0: batch, 1: seq},
                      "attention_mask": {0: batch, 1: torch.export.Dim("total", max=8192)},
                      "past": tuple({0: batch, 2: plen} for _ in past)}
            torch.onnx.export(WithCache(model), (ids, mask, past), str(path), dynamo=True, external_data=True,
                              dynamic_shapes=shapes, **names)
        else:
            axes = {n: {0: "batch", 2: "past"} for n in names["input_names"][2:]}
            axes.update(input_ids={0: "batch", 1: "seq"}, attention_mask={0: "batch", 1: "total"})
            torch.onnx.export(WithCache(model), (ids, mask, past), str(path), dynamo=False, opset_version=20,
                              dynamic_axes=axes, **names)
    return path
