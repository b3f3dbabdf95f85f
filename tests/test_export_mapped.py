"""The export traced with the weights mapped from the checkpoint, not loaded (mapped_model.py), writes what
the loaded route writes, byte for byte, from one file or several shards, and steps aside where it cannot."""

from __future__ import annotations

import logging
import shutil

import pytest

pytest.importorskip("torch")

from onnx_rewriter import cli  # noqa: E402
from onnx_rewriter.hf import checkpoint_refs, tiny  # noqa: E402
from onnx_rewriter.hf import export as export_module  # noqa: E402
from onnx_rewriter.hf import mapped_model as mapped_model_module  # noqa: E402
from onnx_rewriter.hf import vlm as vlm_module  # noqa: E402

from .test_errors import assert_no_output, assert_refused  # noqa: E402

# Every tiny family; gemma2 (soft-capping) and gptj (interleaved RoPE) export but do not rewrite: their
# baselines are compared.
FAMILIES = ["llama", "llama_tied", "smollm", "llama3", "qwen2", "qwen3", "yarn", "mistral", "mistral_window",
            "phi3", "gemma", "gemma2", "gemma3", "granite", "gptj"]
BASELINE_ONLY = ("gemma2", "gptj")
FAST = ("llama", "qwen2", "gemma")
MAPPED, LOADED = "weights mapped from the checkpoint", "is loaded to trace it"


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _export(ckpt, out, monkeypatch, caplog, mapped: bool, baseline_only: bool = False) -> str:
    """Export `ckpt` into `out` (and its baseline into `out`-base) by either route; the log."""
    with monkeypatch.context() as m:
        if not mapped:  # what a user sets to load the model as before
            m.setenv(mapped_model_module.LOAD_WEIGHTS, "1")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="onnx_rewriter"):
            if baseline_only:
                files = checkpoint_refs.checkpoint_files(str(ckpt))
                model, _ = export_module.load_model(str(ckpt), torch_dtype="export", mapped_files=files)
                export_module.export_baseline(model, out.with_name(out.name + "-base") / "model.onnx",
                                              checkpoint=files)
                checkpoint_refs.unmap()
            else:
                export_module.export(str(ckpt), out, keep_baseline=str(out) + "-base")
        if not mapped:
            assert f"is loaded to trace it ({mapped_model_module.LOAD_WEIGHTS} is set)" in caplog.text
        return caplog.text


def _same_outputs(tmp_path, kinds=("", "-base")):
    for kind in kinds:
        mapped, loaded = _files(tmp_path / f"mapped{kind}"), _files(tmp_path / f"loaded{kind}")
        assert sorted(mapped) == sorted(loaded)
        assert [n for n in mapped if mapped[n] != loaded[n]] == []
    return loaded


# Every family in fp32 and the fast ones in bf16 and fp16 too (--runslow); by default one fp32 and one bf16
# case (CI time: each case is two exports; fp16 is traced and verified in tests/test_int4.py).
DEFAULT = {("llama", "float32"), ("qwen2", "bfloat16")}
CASES = [c if c in DEFAULT else pytest.param(*c, marks=pytest.mark.slow)
         for c in [(f, "float32") for f in FAMILIES] + [(f, dt) for f in FAST for dt in ("bfloat16", "float16")]]


@pytest.mark.parametrize(("family", "dtype"), CASES)
def test_mapped_trace_writes_the_loaded_routes_bytes(tmp_path, monkeypatch, caplog, family, dtype):
    ckpt = tiny.build_checkpoint(family, tmp_path / "ckpt", dtype=dtype)
    only = family in BASELINE_ONLY
    said = _export(ckpt, tmp_path / "mapped", monkeypatch, caplog, mapped=True, baseline_only=only)
    assert MAPPED in said and LOADED not in said
    _export(ckpt, tmp_path / "loaded", monkeypatch, caplog, mapped=False, baseline_only=only)
    _same_outputs(tmp_path, ("-base",) if only else ("", "-base"))


def test_weights_the_checkpoint_lacks_are_loaded(tmp_path, monkeypatch, caplog):
    """An fp16 checkpoint holding one weight in fp32 (as some releases keep their norms): the fp16 model has no
    mapping for it (it is cast on load), so the model is loaded."""
    from safetensors.numpy import load_file, save_file

    ckpt = tiny.build_checkpoint("llama", tmp_path / "ckpt", dtype="float16")
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype("float32")
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    said = _export(ckpt, tmp_path / "out", monkeypatch, caplog, mapped=True)
    assert LOADED in said and "model.norm.weight" in said and "dtype float16" in said and MAPPED not in said


def _sharded(tmp_path, family="llama"):
    """A tiny checkpoint saved in several shards, with its model.safetensors.index.json."""
    from transformers import AutoModelForCausalLM

    one = tiny.build_checkpoint(family, tmp_path / "one")
    out = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(one).save_pretrained(out, max_shard_size="100KB")
    for f in one.iterdir():
        if not f.name.startswith("model") and not (out / f.name).exists():
            shutil.copy(f, out / f.name)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (out / "model.safetensors.index.json").is_file()
    return out, shards


def test_sharded_checkpoint_streams_from_each_shard(tmp_path, monkeypatch, caplog):
    ckpt, shards = _sharded(tmp_path)
    assert MAPPED in _export(ckpt, tmp_path / "mapped", monkeypatch, caplog, mapped=True)
    _export(ckpt, tmp_path / "loaded", monkeypatch, caplog, mapped=False)
    loaded = _same_outputs(tmp_path)
    assert len([n for n in loaded if n.startswith("checkpoint-")]) == len(shards)  # linked, not concatenated


@pytest.mark.parametrize("damage", ["missing", "truncated", "truncated before mapping", "truncated mid-export"])
def test_damaged_shard_is_one_line_and_no_output(tmp_path, capsys, monkeypatch, damage):
    """Each damage is caught where it can first be seen: before the load (the checks of every file against its
    header), when the shards are mapped (a file shorter than its header says is never mapped: reading a page
    past its end would be a SIGBUS, not an error) and when the rewrite streams the weights."""
    ckpt, shards = _sharded(tmp_path)
    shard = shards[1]

    def truncate():  # the header whole, the data short
        data = shard.read_bytes()
        assert 8 + int.from_bytes(data[:8], "little") < len(data) // 2
        shard.write_bytes(data[: len(data) // 2])

    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        truncate()
    elif damage == "truncated before mapping":  # after the checks, before the model is built and mapped
        real_load = export_module.load_model

        def truncate_then_load(*a, **k):
            truncate()
            return real_load(*a, **k)

        monkeypatch.setattr(export_module, "load_model", truncate_then_load)
        monkeypatch.setattr(mapped_model_module.mmap, "mmap", lambda *a, **k: pytest.fail("a shard was mapped"))
    else:  # after the trace, before the rewrite streams the weights
        real = export_module.export_baseline

        def then_truncate(*a, **k):
            path = real(*a, **k)
            truncate()
            return path

        monkeypatch.setattr(export_module, "export_baseline", then_truncate)
    out = tmp_path / "out"
    code = cli.main(["export", "--model", str(ckpt), "--output-dir", str(out)])
    err = capsys.readouterr().err
    words = {"missing": (shard.name, "missing", "download"), "truncated": (shard.name, "truncated"),
             "truncated before mapping": (shard.name, "truncated", "its header needs", "download")}
    assert_refused(code, err, *words.get(damage, ("truncated",)))
    assert_no_output(out)



@pytest.mark.parametrize("family", ["qwen2_5_vl", pytest.param("qwen3_vl", marks=pytest.mark.slow)])
def test_vlm_text_decoder_is_traced_mapped(models, tmp_path, family):
    """The VLM route maps the checkpoint too (hf/vlm.py; Qwen2.5-VL's checkpoint keys are transformers' legacy
    names, renamed on load): its text decoder rewrites to the bytes the loaded model's baseline (the shared
    fixture, what the loaded route exports) rewrites to. Only the trace is extra: the whole folder is the slow
    test below."""
    from onnx_rewriter.pipeline import steps as pipeline

    ckpt = models.vlm_checkpoint(family)
    files = checkpoint_refs.checkpoint_files(str(ckpt))
    vlm, config = vlm_module.load_vlm(str(ckpt), mapped_files=files)
    assert checkpoint_refs.maps(vlm)
    try:
        base = vlm_module.export_text_baseline(vlm, config, tmp_path / "base" / "model.onnx", checkpoint=files)
    finally:
        checkpoint_refs.unmap()
    del vlm
    assert "model.onnx.data" not in {p.name for p in base.parent.iterdir()}  # the weights stay in the checkpoint
    for name, source in (("mapped", base), ("loaded", models.vlm_baseline(family))):
        pipeline.rewrite(source, tmp_path / name, dtype="float16", tokenizer=ckpt)
    _same_outputs(tmp_path, ("",))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl"])
def test_vlm_export_mapped_writes_the_loaded_routes_folder(models, tmp_path, monkeypatch, caplog, family):
    """`export` of a VLM, llm/ and visual/: the same bytes whether the text decoder was mapped or loaded."""
    ckpt = models.vlm_checkpoint(family)
    said = _export(ckpt, tmp_path / "mapped", monkeypatch, caplog, mapped=True)
    assert MAPPED in said and LOADED not in said
    _export(ckpt, tmp_path / "loaded", monkeypatch, caplog, mapped=False)
    files = _same_outputs(tmp_path, ("",))
    assert any(n.startswith("llm/") for n in files) and any(n.startswith("visual/") for n in files)



def test_bf16_vlm_is_traced_mapped_and_verifies(models, tmp_path, caplog):
    """A bf16 VLM checkpoint (every real Qwen-VL release) is traced in bf16 with its weights mapped, as the text
    route traces a bf16 LLM: the text decoder is never loaded (an fp32 trace would cast it on load), and the
    folder verifies against transformers."""
    ckpt = models.vlm_checkpoint("qwen2_5_vl", "bfloat16")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="onnx_rewriter"):
        export_module.export(str(ckpt), out)
    assert MAPPED in caplog.text and LOADED not in caplog.text
    assert cli.main(["verify", str(out), "--model", str(ckpt), "--steps", "2"]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl"])
def test_bf16_vlm_export_mapped_writes_the_loaded_routes_folder(models, tmp_path, monkeypatch, caplog, family):
    ckpt = models.vlm_checkpoint(family, "bfloat16")
    said = _export(ckpt, tmp_path / "mapped", monkeypatch, caplog, mapped=True)
    assert MAPPED in said and LOADED not in said
    _export(ckpt, tmp_path / "loaded", monkeypatch, caplog, mapped=False)
    _same_outputs(tmp_path, ("",))
