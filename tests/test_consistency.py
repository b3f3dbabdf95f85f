"""verify reads the folder as the runtime does (issue 25, items 4, 5, 9): before any numbers, the folder's files
must agree with each other, with the contract and with --model; each problem is one `FAIL:` line naming the
file, verify exits 1 without loading a model, and the folder is left byte for byte as it was.
"""

from __future__ import annotations

import json
import shutil
import sys
import time

import onnx
import pytest

from onnx_rewriter import cli
from onnx_rewriter.pipeline import steps as pipeline

from .test_safety import leftovers, tree


@pytest.fixture(scope="module")
def folder(models, tmp_path_factory):
    """A fp32 edgellm-0.9 rewrite of the tiny Llama, written once; tests edit copies of it."""
    out = tmp_path_factory.mktemp("consistency") / "out"
    pipeline.rewrite(models.baseline("llama"), out, dtype="float32")
    return out


def _set_config(key, value):
    def edit(out):
        cfg = json.loads((out / "config.json").read_text())
        if value is None:
            del cfg[key]
        else:
            cfg[key] = value
        (out / "config.json").write_text(json.dumps(cfg))
    return edit


def _set_plugin_attr(name, value):
    def edit(out):
        m = onnx.load(str(out / "model.onnx"))
        for node in m.graph.node:
            if node.op_type == "AttentionPlugin":
                next(a for a in node.attribute if a.name == name).i = value
        onnx.save(m, str(out / "model.onnx"))
    return edit


def _negative_offset(out):
    m = onnx.load(str(out / "model.onnx"))
    onnx.save(m, str(out / "model.onnx"), save_as_external_data=True, location="model.onnx.data", size_threshold=1024)
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    t = next(t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    next(e for e in t.external_data if e.key == "offset").value = "-100"
    onnx.save(m, str(out / "model.onnx"))


def _write(name, text):
    return lambda out: (out / name).write_text(text)


def _delete(name):
    return lambda out: (out / name).unlink()


def _big_tokenizer(out):
    """The tokenizer.json of another model: ids up to 999 beside 320 embedding rows."""
    data = json.loads((out / "tokenizer.json").read_text())
    data["model"]["vocab"].update({f"extra{i}": i for i in range(320, 1000)})
    (out / "tokenizer.json").write_text(json.dumps(data))


# (case, edit of the folder, --model family or None (the folder's own), words of one FAIL line)
ROWS = [
    ("kv_cache_dtype fp8 beside an fp16 cache", _set_config("kv_cache_dtype", "fp8"), None,
     ["model.onnx", "past_key_values_0", "kv_cache_dtype is 'fp8'"]),
    ("kv_cache_dtype int3", _set_config("kv_cache_dtype", "int3"), None,
     ["config.json", "kv_cache_dtype 'int3' is none of"]),
    ("kv_cache_dtype missing", _set_config("kv_cache_dtype", None), None,
     ["config.json", "missing kv_cache_dtype"]),
    ("vocab_size 300 beside 320 rows", _set_config("vocab_size", 300), None,
     ["model.onnx", "logits has 320", "vocab_size is 300"]),
    ("num_attention_heads -4", _set_config("num_attention_heads", -4), None,
     ["config.json", "num_attention_heads is -4", "positive integer"]),
    ("partial_rotary_factor edited", _set_config("partial_rotary_factor", 0.5), None,
     ["model.onnx", "rope_rotary_cos_sin is 16 wide", "partial_rotary_factor 0.5 gives 8"]),
    ("tokenizer.json deleted", _delete("tokenizer.json"), None, ["tokenizer.json", "missing"]),
    ("a tokenizer larger than the embedding", _big_tokenizer, None, ["tokenizer.json", "token ids reach 999", "320"]),
    ("plugin num_kv_heads edited", _set_plugin_attr("num_kv_heads", 4), None,
     ["model.onnx", "num_kv_heads=4", "num_key_value_heads is 2"]),
    ("plugin num_q_heads edited", _set_plugin_attr("num_q_heads", 8), None,
     ["model.onnx", "num_q_heads=8", "num_attention_heads is 4"]),
    ("external data offset -100", _negative_offset, None,
     ["model.onnx", "external data", "-100", "rewrite the folder again"]),
    ("config.json not JSON", _write("config.json", "{not json"), None, ["config.json", "not readable json"]),
    ("--model another model", None, "smollm", ["config.json", "hidden_size=64", "hidden_size=144", "--model"]),
    ("text folder, --model a VLM", None, "qwen2_5_vl", ["config.json", "text llm", "vision-language model"]),
]


@pytest.mark.parametrize("case,edit,other,words", ROWS, ids=[r[0] for r in ROWS])
def test_inconsistent_folder_fails_naming_the_file(folder, models, tmp_path, capsys, case, edit, other, words):
    out = tmp_path / "out"
    shutil.copytree(folder, out)
    if edit is not None:
        edit(out)
    if other is None:
        model = models.checkpoint("llama")
    elif other == "qwen2_5_vl":
        model = models.vlm_checkpoint(other)
    else:
        model = models.checkpoint(other)
    before, ckpt_before = tree(out), tree(model)
    t0 = time.perf_counter()
    code = cli.main(["verify", str(out), "--model", str(model), "-q"])
    took = time.perf_counter() - t0
    stdout, err = capsys.readouterr()
    assert code == 1, (stdout, err)
    assert "Traceback" not in err and "internal error" not in err, err
    fails = [line for line in stdout.splitlines() if line.startswith("FAIL: ")]
    assert any(all(w.lower() in line.lower() for w in words) for line in fails), (words, stdout)
    assert stdout.strip().splitlines()[-1].startswith("verify FAILED (the folder's files agree"), stdout
    assert took < 20  # no model loaded, no numbers run
    assert tree(out) == before and tree(model) == ckpt_before
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("target", ["edgellm-0.5", "edgellm-0.9", "edgellm-0.10", "edgellm-0.11"])
def test_every_target_output_is_consistent(models, tmp_path, target):
    """No false FAIL: what each target writes (fp16) passes the pass, against its own checkpoint."""
    from onnx_rewriter.verification import consistency

    out = tmp_path / target
    pipeline.rewrite(models.baseline("llama"), out, target=target)
    assert consistency.check(out, str(models.checkpoint("llama")), vlm=False) == []


# ------------------------------------------------------------------ VLM folders (item 4, item 9)


@pytest.fixture(scope="module")
def vlm_export(models, tmp_path_factory):
    """The export layout (OUT/llm/, OUT/visual/) without the slow vision export: llm/ is the rewritten decoder,
    visual/ a placeholder the consistency pass only looks for (the numbers are never run here)."""
    ckpt = models.vlm_checkpoint("qwen2_5_vl")
    root = tmp_path_factory.mktemp("vlm") / "out"
    pipeline.rewrite(models.vlm_baseline("qwen2_5_vl"), root / "llm", dtype="float32", tokenizer=ckpt)
    return ckpt, root


VLM_ROWS = {"no visual/": "visual/model.onnx: missing",
            "onnx_rewriter.vision not installed": "onnx_rewriter.vision is not installed",
            "num_deepstack_features edited": "0 deepstack_embeds inputs but config.json num_deepstack_features is 2"}


@pytest.mark.parametrize("case", list(VLM_ROWS))
def test_vlm_export_without_its_vision_encoder_fails(vlm_export, tmp_path, capsys, monkeypatch, case):
    ckpt, src = vlm_export
    root = tmp_path / "out"
    shutil.copytree(src, root)
    if case != "no visual/":
        (root / "visual").mkdir()
        (root / "visual" / "model.onnx").write_bytes(b"placeholder")
    if case == "onnx_rewriter.vision not installed":
        monkeypatch.setitem(sys.modules, "onnx_rewriter.vision", None)  # what a wheel without it does
    if case == "num_deepstack_features edited":
        _set_config("num_deepstack_features", 2)(root / "llm")
    before = tree(root)
    code = cli.main(["verify", str(root), "--model", str(ckpt), "-q"])
    stdout, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err and "internal error" not in err, (stdout, err)
    fail = [line for line in stdout.splitlines() if line.startswith("FAIL: ")]
    assert len(fail) == 1 and VLM_ROWS[case] in fail[0], stdout
    assert tree(root) == before and leftovers(tmp_path) == []


def test_vlm_chat_template_taking_only_strings(vlm_export, tmp_path, capsys):
    """A Qwen2.5-VL chat template that concatenates `message['content']` as a string: verify renders the prompts
    as strings (the image as its placeholder) and runs, instead of a TypeError from the template."""
    ckpt, src = vlm_export
    model = tmp_path / "ckpt"
    shutil.copytree(ckpt, model)
    (model / "chat_template.jinja").write_text(
        "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    decoder = tmp_path / "decoder"  # a bare decoder folder (the rewrite route): no visual/ expected
    shutil.copytree(src / "llm", decoder)
    before = tree(model)
    code = cli.main(["verify", str(decoder), "--model", str(model), "--steps", "1"])
    stdout, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err, (stdout, err)
    assert "image row: 16 image tokens" in stdout and "verify PASSED" in stdout, stdout
    assert tree(model) == before
