"""W+A logit agreement on held-out prompts: the FP16 model against its fake-quantized twin as each folder holds it
(FP8, NVFP4, INT8-SQ: the folder's quantized weights rebuilt from the model and its activation quantizers with the
folder's scales, verification/wa_check.twin, the model verify checks the folder against bit for bit per linear).

    python bench/wa_agreement.py CHECKPOINT NAME=OUT_DIR [NAME=OUT_DIR ...]   -> one JSON line

Teacher-forced over every position of prompts that are not in the calibration set (bench/int4_agreement.py's),
both models in fp16 (the graph's activation type), so the numbers are the quantization's alone.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from int4_agreement import HELD_OUT


def main(argv) -> int:
    import onnx
    import torch
    from tokenizers import Tokenizer

    from onnx_rewriter.features.wa_quant import wa_linears
    from onnx_rewriter.verification import wa_check
    from onnx_rewriter.verification.llm import HFOracle

    ckpt, folders = argv[0], dict(a.split("=", 1) for a in argv[1:])
    tok = Tokenizer.from_file(f"{ckpt}/tokenizer.json")
    rows = [tok.encode(t).ids for t in HELD_OUT]

    def logits(model):
        with torch.no_grad():
            return [model(input_ids=torch.tensor([r])).logits[0].float().numpy() for r in rows]

    base = HFOracle(ckpt)
    original = logits(base.model.to(torch.float16))
    del base
    out = {}
    for name, folder in folders.items():
        specs = wa_linears(onnx.load(f"{folder}/model.onnx", load_external_data=False), folder)
        twin = wa_check.twin(HFOracle(ckpt), specs)
        cos, agree, total = [], 0, 0
        for a, b in zip(original, logits(twin.model)):
            cos += list((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += len(a)
        out[name] = {"linears": len(specs), "cosine_mean": round(float(np.mean(cos)), 6),
                     "cosine_min": round(float(np.min(cos)), 6), "top1": f"{agree}/{total}"}
        del twin
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
