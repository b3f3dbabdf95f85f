"""Bad input that used to pass silently or end in an internal error (issue 25, items 6-9, 11): each is one
`error:` line naming the file or option (exit 2), the inputs stay byte for byte as they were, nothing is left.
"""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
from onnx import TensorProto

from onnx_rewriter import cli
from onnx_rewriter.modelio import normalize

from .test_errors import assert_no_output, assert_refused
from .test_safety import leftovers, tree


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _big_tokenizer(src, dst):
    """The tiny tokenizer with ids up to 999: another model's tokenizer beside a 320-row embedding."""
    dst.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / f).is_file():
            shutil.copy(src / f, dst / f)
    data = json.loads((dst / "tokenizer.json").read_text())
    data["model"]["vocab"].update({f"extra{i}": i for i in range(320, 1000)})
    (dst / "tokenizer.json").write_text(json.dumps(data))
    return dst


# ------------------------------------------------------------------ item 6: tokenizer vs embedding rows


@pytest.mark.parametrize("route", ["rewrite", "export"])
def test_tokenizer_larger_than_the_embedding(base, ckpt, tmp_path, capsys, route):
    tok = _big_tokenizer(ckpt, tmp_path / "tok")
    out = tmp_path / "out"
    inputs = [base.parent, ckpt, tok]
    before = [tree(p) for p in inputs]
    argv = ([base, out] if route == "rewrite" else ["export", "--model", ckpt, "--output-dir", out])
    code, _, err = run_cli(capsys, *argv, "--tokenizer", tok)
    assert_refused(code, err, "tokenizer", "token ids up to 999", "320 rows", "--tokenizer")
    assert [tree(p) for p in inputs] == before
    assert_no_output(out)
    assert leftovers(tmp_path) == []


def test_smaller_tokenizer_is_fine(base, tmp_path):
    """HF tokenizers may have fewer ids than vocab_size (padding rows): only more is refused."""
    from onnx_rewriter.sidefiles.writer import check_tokenizer_rows

    check_tokenizer_rows(base.parent / "tokenizer.json", base.parent, 384)


# ------------------------------------------------------------------ item 7: onnxruntime-fused graphs


@pytest.fixture
def ort_fused(base, tmp_path):
    from onnxruntime.transformers.optimizer import optimize_model

    dst = tmp_path / "fused"
    dst.mkdir()
    optimize_model(str(base), model_type="gpt2", num_heads=4, hidden_size=64, opt_level=1).save_model_to_file(
        str(dst / "model.onnx"))
    shutil.copy(base.parent / "config.json", dst / "config.json")
    return dst / "model.onnx"


def test_ort_fused_ops_refused_alike_by_inspect_and_rewrite(ort_fused, tmp_path, capsys):
    before = tree(ort_fused.parent)
    code, out, err = run_cli(capsys, "inspect", ort_fused)
    assert code == 1, (out, err)
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("verdict: would NOT rewrite") and "SimplifiedLayerNormalization" in verdict, out
    dst = tmp_path / "out"
    code, _, err = run_cli(capsys, ort_fused, dst, "--no-tokenizer")
    assert_refused(code, err, "onnxruntime-fused", "SimplifiedLayerNormalization", "optimize_model")
    assert "internal error" not in err
    assert verdict.split("would NOT rewrite: ")[1] == err.strip().splitlines()[-1].removeprefix("error: ")
    assert tree(ort_fused.parent) == before
    assert_no_output(dst)


# ------------------------------------------------------------------ item 8: empty corpus / token list


@pytest.mark.parametrize("option,text,words", [
    ("--vocab-corpus", "", ["--vocab-corpus", "holds no text"]),
    ("--vocab-corpus", " \n\t\n", ["--vocab-corpus", "holds no text"]),
    ("--keep-tokens", "", ["--keep-tokens", "holds no token id"]),
    ("--keep-tokens", "# only a comment\n, ,\n", ["--keep-tokens", "holds no token id"]),
])
@pytest.mark.parametrize("route", ["rewrite", "export"])
def test_empty_vocabulary_sources_refused(base, ckpt, tmp_path, capsys, option, text, words, route):
    src = tmp_path / "empty.txt"
    src.write_text(text)
    out = tmp_path / "out"
    before = [tree(base.parent), tree(ckpt)]
    argv = ([base, out] if route == "rewrite" else ["export", "--model", ckpt, "--output-dir", out])
    code, _, err = run_cli(capsys, *argv, "--reduce-vocab", option, src)
    assert_refused(code, err, *words, str(src))
    assert [tree(base.parent), tree(ckpt)] == before
    assert_no_output(out)


# ------------------------------------------------------------------ item 9: internal errors on bad input


def _negative_heads(base, ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_attention_heads"] = -4
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return ["export", "--model", ckpt, "--output-dir", tmp_path / "out"], ["num_attention_heads=-4", "positive integer"]


def _negative_offset(base, ckpt, tmp_path):
    proto = onnx.load(str(base), load_external_data=False)
    t = next(t for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL)
    next(e for e in t.external_data if e.key == "offset").value = "-100"
    onnx.save(proto, str(base))
    return [base, tmp_path / "out"], [t.name, "external data", "offset", "re-export"]


def _long_name(base, ckpt, tmp_path):
    return [base, tmp_path / ("o" * 260)], ["output folder name", "260 bytes", "shorter name"]


def _unpicklable_bin(base, ckpt, tmp_path):
    for f in ckpt.glob("*.safetensors"):
        f.unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not a pickle torch would load " * 8)
    return ["export", "--model", ckpt, "--output-dir", tmp_path / "out"], ["pytorch_model.bin", "unpickle",
                                                                           "safetensors"]


@pytest.mark.parametrize("make", [_negative_heads, _negative_offset, _long_name, _unpicklable_bin],
                         ids=lambda f: f.__name__.strip("_"))
def test_bad_input_is_one_line_not_an_internal_error(base, ckpt, tmp_path, capsys, make):
    argv, words = make(base, ckpt, tmp_path)
    before = [tree(base.parent), tree(ckpt)]
    code, _, err = run_cli(capsys, *argv)
    assert_refused(code, err, *words)
    assert "internal error" not in err
    assert [tree(base.parent), tree(ckpt)] == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ckpt"]  # no output, no temporary folder


# ------------------------------------------------------------------ item 11: tied lm_head through a Transpose


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_reduce_vocab_on_a_tied_head_read_through_transpose(models, tmp_path, capsys, monkeypatch, dtype):
    """`make export` of a tied model whose weight is too large to fold (a real Qwen2.5): lm_head reads
    Transpose(weight), shared with the embedding. Folding stops at a lower size here so the tiny model is
    "too large" too; the cut reads the weight through the Transpose and verify compares it with transformers."""
    from safetensors.numpy import load_file

    monkeypatch.setattr(normalize, "MAX_FOLD_ELEMENTS", 16384)  # < the tiny 320x64 weight
    base, ckpt = models.baseline("llama_tied", refs=True), models.checkpoint("llama_tied")
    proto = onnx.load(str(base), load_external_data=False)
    head = next(n for n in proto.graph.node if n.op_type == "MatMul" and n.output[0] == "logits")
    producer = next(n for n in proto.graph.node if head.input[1] in n.output)
    assert producer.op_type == "Transpose"  # the case of the issue
    keep = tmp_path / "keep.txt"
    keep.write_text("7 8 9 50 100 200\n")
    out = tmp_path / "out"
    before = tree(base.parent)
    code, _, err = run_cli(capsys, base, out, "--dtype", dtype, "--reduce-vocab", "--keep-tokens", keep, "-q")
    assert code == 0, err
    vmap = load_file(str(out / "vocab_map.safetensors"))["vocab_map"]
    assert {7, 8, 9, 50, 100, 200} <= set(vmap.tolist())
    assert load_file(str(out / "embedding.safetensors"))["embedding"].shape == (320, 64)  # stays whole
    code, stdout, err = run_cli(capsys, "verify", out, "--model", ckpt, "--steps", "2")
    assert code == 0 and "verify PASSED" in stdout, (stdout, err)
    assert f"logits compared at the {len(vmap)} kept ids of 320" in stdout
    assert tree(base.parent) == before
