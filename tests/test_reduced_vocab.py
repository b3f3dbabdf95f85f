"""--reduce-vocab: lm_head keeps the corpus / listed tokens plus specials, every EOS id and the chat template's
tokens; vocab_map.safetensors and reduced_vocab_size are written; logits equal the full model's at the kept
ids and greedy text maps back to the same text; option errors fail before any work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from safetensors.numpy import load_file

from onnx_rewriter.cli import main
from onnx_rewriter.features import reduced_vocab
from onnx_rewriter.hf import tiny
from onnx_rewriter.pipeline import steps as pipeline
from onnx_rewriter.verification.llm import verify

CORPUS = "The quick brown fox jumps over the lazy dog.\nThe capital of France is Paris.\n"
SPECIALS = list(range(len(tiny.SPECIAL_TOKENS)))  # <unk> <s> </s> <pad> <|im_start|> <|im_end|>: ids 0-5
EXTRA_EOS = 301  # an EOS id only generation_config.json names


@pytest.fixture(scope="module")
def tok_dir(models, tmp_path_factory) -> Path:
    """The tiny tokenizer, with a generation_config.json naming one more EOS id."""
    ckpt = models.checkpoint("qwen2")
    d = tmp_path_factory.mktemp("tok")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(ckpt / f, d / f)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, EXTRA_EOS]}))
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text(CORPUS)
    return p


def test_selection_is_exactly_specials_eos_and_the_list(tmp_path):
    """Without a chat template and corpus: the listed ids, the special tokens and every EOS id, nothing else;
    --vocab-multiple pads with the lowest unused ids."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny.build_tokenizer(tmp_path / "tok", chat_template=None)))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 310}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 300]}))
    (tmp_path / "keep.txt").write_text("# ids\n17, 40\n99\n")
    vmap, info = reduced_vocab.select(tok, 320, [], tmp_path / "keep.txt", [tmp_path], None)
    assert vmap.tolist() == [0, 1, 2, 3, 4, 5, 17, 40, 99, 300, 310] and vmap.dtype == np.int32
    assert info["eos_ids"] == [2, 300, 310] and info["special_ids"] == SPECIALS
    vmap, info = reduced_vocab.select(tok, 320, [], tmp_path / "keep.txt", [tmp_path], 16)
    assert vmap.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 17, 40, 99, 300, 310]
    assert info["kept_from"]["padding"] == 5


def test_corpus_and_chat_template_tokens_stay(tok_dir, corpus):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    vmap, info = reduced_vocab.select(tok, 320, [corpus], None, [tok_dir], None)
    kept = set(vmap.tolist())
    text_ids = set(tok(CORPUS, add_special_tokens=False)["input_ids"])
    role_ids = set(tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
    assert text_ids <= kept and role_ids <= kept and set(SPECIALS) | {EXTRA_EOS} <= kept
    assert info["kept_from"]["corpus"] == len(text_ids)


@pytest.mark.parametrize("target", ["edgellm-0.9", "edgellm-0.10", "edgellm-0.11"])
def test_reduced_vocab_qwen2_verifies(models, tok_dir, corpus, tmp_path, target):
    base, ckpt = models.baseline("qwen2"), models.checkpoint("qwen2")
    out = tmp_path / "out"
    run = pipeline.rewrite(base, out, target=target, tokenizer=tok_dir, reduce_vocab=True, vocab_corpus=[corpus],
                           vocab_multiple=8)
    vmap = load_file(str(out / "vocab_map.safetensors"))["vocab_map"]
    r = len(vmap)
    assert vmap.dtype == np.int32 and vmap.ndim == 1 and r % 8 == 0 and r < 320
    assert np.all(np.diff(vmap) > 0) and set(SPECIALS) | {EXTRA_EOS} <= set(vmap.tolist())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["reduced_vocab_size"] == r and cfg["vocab_size"] == 320
    rep = run.report.features["reduced_vocab"]
    assert (rep["vocab_size"], rep["reduced_vocab_size"]) == (320, r)
    assert rep["lm_head_bytes"] == 64 * 320 * 2 and rep["lm_head_bytes_saved"] == 64 * (320 - r) * 2
    model = onnx.load(str(out / "model.onnx"))
    logits = next(o for o in model.graph.output if o.name == "logits")
    assert logits.type.tensor_type.shape.dim[-1].dim_value == r
    inits = {t.name: t for t in model.graph.initializer}
    head = next(n for n in model.graph.node if n.name == "/lm_head/MatMul")
    assert list(inits[head.input[1]].dims) == [64, r]
    assert load_file(str(out / "embedding.safetensors"))["embedding"].shape == (320, 64)  # stays whole
    res = verify(out, model=str(ckpt), steps=4, quiet=True)
    assert res.passed, res.table()
    assert res.reduced_vocab == (r, 320)


def test_tied_head_gets_its_own_cut_copy_and_greedy_text_maps_back(models, tok_dir, corpus, tmp_path):
    """A tied lm_head is cut, the embedding stays whole; greedy tokens on the reduced folder, mapped through
    vocab_map, are transformers' greedy tokens among the kept ids, and decode to the same text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from onnx_rewriter.verification.generate import greedy

    base, ckpt = models.baseline("llama_tied"), models.checkpoint("llama_tied")
    out = tmp_path / "out"
    pipeline.rewrite(base, out, tokenizer=tok_dir, reduce_vocab=True, vocab_corpus=[corpus])
    vmap = load_file(str(out / "vocab_map.safetensors"))["vocab_map"].astype(np.int64)
    assert load_file(str(out / "embedding.safetensors"))["embedding"].shape == (320, 64)
    res = verify(out, model=str(ckpt), steps=4, quiet=True)
    assert res.passed, res.table()
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    prompt = tok("The capital of France", add_special_tokens=False)["input_ids"]
    ours = greedy(out, prompt, 8)
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    seq, theirs = list(prompt), []
    with torch.no_grad():
        for _ in range(8):
            logits = hf(torch.tensor([seq])).logits[0, -1].numpy()
            theirs.append(int(vmap[logits[vmap].argmax()]))
            seq.append(theirs[-1])
    assert ours == theirs and set(ours) <= set(vmap.tolist())
    assert tok.decode(ours) == tok.decode(theirs)


@pytest.mark.parametrize("argv,words", [
    (["--vocab-corpus", "CORPUS"], "--vocab-corpus needs --reduce-vocab"),
    (["--reduce-vocab"], "--reduce-vocab needs the tokens to keep"),
    (["--reduce-vocab", "--vocab-corpus", "missing.txt"], "'missing.txt' is not a file"),
    (["--reduce-vocab", "--vocab-corpus", "CORPUS", "--vocab-multiple", "0"], "--vocab-multiple 0"),
])
def test_option_errors(models, corpus, tmp_path, capsys, argv, words):
    argv = [str(corpus) if a == "CORPUS" else a for a in argv]
    code = main([str(models.baseline("qwen2")), str(tmp_path / "out")] + argv)
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: ") and words in err, err
    assert not (tmp_path / "out").exists()


def test_no_tokenizer_refused(models, corpus, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main([str(models.baseline("qwen2")), str(tmp_path / "out"), "--tokenizer", str(empty),
                 "--reduce-vocab", "--vocab-corpus", str(corpus)])
    err = capsys.readouterr().err
    assert code == 2 and "--reduce-vocab needs the model's tokenizer" in err.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_keep_tokens_out_of_range_refused(models, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("5 320\n")
    code = main([str(models.baseline("qwen2")), str(tmp_path / "out"), "--reduce-vocab", "--keep-tokens",
                 str(tmp_path / "keep.txt")])
    err = capsys.readouterr().err
    assert code == 2 and "token id 320 is outside the vocabulary (size 320)" in err
    assert not (tmp_path / "out").exists()
