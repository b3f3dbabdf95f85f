"""INT4 logit agreement on held-out prompts: the transformers model against itself holding the weights each
INT4 output folder's plugins hold (rebuilt from the model as verify does: features/int4.load_dequantized).

    python bench/int4_agreement.py CHECKPOINT NAME=OUT_DIR [NAME=OUT_DIR ...]   -> one JSON line

Teacher-forced over every position of a few prompts that are not in the calibration set; one model in
memory (its original logits are kept, then its weights are swapped per folder and restored).
"""

from __future__ import annotations

import json
import sys

import numpy as np

HELD_OUT = (
    "The library opens at nine and closes at five, except on Sundays when it stays closed all day.",
    "Write a short poem about the ocean at night, with waves, stars and a lighthouse.",
    "import os\nfor root, dirs, files in os.walk('.'):\n    print(root, len(files))",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen inside the leaves.",
)


def main(argv) -> int:
    import onnx
    import torch
    from tokenizers import Tokenizer

    from onnx_rewriter.features.int4 import int4_nodes, load_dequantized
    from onnx_rewriter.hf.export import load_model

    ckpt, folders = argv[0], dict(a.split("=", 1) for a in argv[1:])
    model, _ = load_model(ckpt, torch_dtype="float32")
    tok = Tokenizer.from_file(f"{ckpt}/tokenizer.json")
    rows = [tok.encode(t).ids for t in HELD_OUT]

    def logits():
        with torch.no_grad():
            return [model(input_ids=torch.tensor([r])).logits[0].float().numpy() for r in rows]

    original = logits()
    # only the Linear weights are swapped; kept as bf16 where that is exact (the bench checkpoints are bf16):
    # a full fp32 copy of the model doubled the peak (16 GB at 1.5b)
    linears = {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    saved = {n: _compact(w) for n, w in linears.items()}
    out = {}
    for name, folder in folders.items():
        load_dequantized(model, int4_nodes(onnx.load(f"{folder}/model.onnx")))
        cos, agree, total = [], 0, 0
        for a, b in zip(original, logits()):
            cos += list((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += len(a)
        out[name] = {"cosine_mean": round(float(np.mean(cos)), 6), "cosine_min": round(float(np.min(cos)), 6),
                     "top1": f"{agree}/{total}"}
        with torch.no_grad():
            for n, w in linears.items():
                w.copy_(saved[n])
    print(json.dumps(out))
    return 0


def _compact(w):
    import torch

    b = w.detach().to(torch.bfloat16)
    return b if torch.equal(b.float(), w.detach()) else w.detach().clone()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
