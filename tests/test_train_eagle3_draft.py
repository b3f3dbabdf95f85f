"""bench/train_eagle3_draft.py on a tiny checkpoint (seconds): the draft it writes is a checkpoint that
hf/eagle3_draft.py loads, with the taps and vocabulary it was trained on. The real SmolLM2 run is reported in
bench/README.md ("EAGLE3 draft for SmolLM2-135M"), not run here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from onnx_rewriter.hf.eagle3_draft import load_draft, target_layer_ids

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "train_eagle3_draft.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_eagle3_draft", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_training_writes_a_loadable_draft(models, tmp_path):
    ckpt = models.checkpoint("llama")
    out = tmp_path / "draft"
    mod = _script()
    assert mod.main(["--base", str(ckpt), "--out", str(out), "--max-prompts", "4", "--new-tokens", "6",
                     "--draft-vocab", "64", "--epochs", "1", "--seq", "16", "--ttt", "2"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    n = json.loads((ckpt / "config.json").read_text())["num_hidden_layers"]
    assert target_layer_ids(cfg) == mod.default_layers(n)
    emb = torch.zeros(cfg["vocab_size"], cfg["hidden_size"])
    draft = load_draft(out, base_embedding=emb)
    ids = draft.d2t + torch.arange(cfg["draft_vocab_size"])
    assert ids.tolist() == sorted(set(ids.tolist())) and bool(draft.t2d[ids].all())
    assert int(draft.t2d.sum()) == cfg["draft_vocab_size"] == 64
