"""Scale and speed machinery: streamed weight writing, float conversion, mask probe reuse, tokenizer child,
progress bars, summary sizes. Fast: synthetic tensors and the shared tiny exports only (bench/ has the
large models)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_rewriter.modelio import graph as graphio
from onnx_rewriter.modelio import stream

EDGES = np.array([0.0, -0.0, 1e-8, -3e-7, 6e-5, 6.1e-5, 65504, 65519, 65520, -7e4, 1e5, np.inf, -np.inf, np.nan,
                  1 / 3, np.pi], dtype=np.float32)


def _external(tmp_path, name, arr, data_type=None, offset=128):
    """A TensorProto whose bytes live in tmp_path/'w.bin' at `offset` (after some other bytes)."""
    raw = np.ascontiguousarray(arr).tobytes()
    with open(tmp_path / "w.bin", "wb") as fh:
        fh.write(b"\x07" * offset + raw + b"\x09" * 64)
    t = TensorProto(name=name, data_type=data_type or helper.np_dtype_to_tensor_dtype(arr.dtype), dims=arr.shape)
    for k, v in (("location", "w.bin"), ("offset", str(offset)), ("length", str(len(raw)))):
        e = t.external_data.add()
        e.key, e.value = k, v
    t.data_location = TensorProto.EXTERNAL
    return t


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    return (np.asarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def test_caster_matches_numpy_bit_for_bit():
    rng = np.random.default_rng(0)
    x = np.concatenate([EDGES, (rng.standard_normal(10_000) * 10 ** rng.uniform(-8, 5, 10_000)).astype(np.float32)])
    out = np.empty(x.size, np.float16)
    stream.Caster()(x, TensorProto.FLOAT, out, TensorProto.FLOAT16)
    with np.errstate(over="ignore"):
        assert np.array_equal(out.view(np.uint16), x.astype(np.float16).view(np.uint16))
    bits = _bf16_bits(x)
    f32 = np.empty(x.size, np.float32)
    stream.Caster()(bits, TensorProto.BFLOAT16, f32, TensorProto.FLOAT)
    assert np.array_equal(f32.view(np.uint32), bits.astype(np.uint32) << 16)
    stream.Caster()(bits, TensorProto.BFLOAT16, out, TensorProto.FLOAT16)
    with np.errstate(over="ignore"):
        assert np.array_equal(out.view(np.uint16), f32.astype(np.float16).view(np.uint16))
    back = np.empty(x.size, np.uint16)  # to bf16: numpy's round to nearest even on the top 16 bits
    stream.Caster()(f32, TensorProto.FLOAT, back, TensorProto.BFLOAT16)
    assert np.array_equal(back, bits)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64])
def test_chunks_from_external_data(tmp_path, monkeypatch, dtype):
    arr = (np.arange(10_007) * 3 - 7).astype(dtype).reshape(1, -1)
    t = _external(tmp_path, "w", arr)
    got = np.concatenate([c.copy() for c in stream.chunks(t, tmp_path, chunk_bytes=1000)])
    assert np.array_equal(got, arr.reshape(-1))


def _in_passes(monkeypatch):
    """Transposed weights of any size read in passes (stream._transposed_in_passes): 7 output rows per pass,
    11 source rows per read (short last ones both)."""
    monkeypatch.setattr(stream, "TRANSPOSE_MAPPED_BYTES", 0)
    monkeypatch.setattr(stream, "TRANSPOSE_BLOCK_BYTES", 7 * 300 * 2)
    monkeypatch.setattr(stream, "CHUNK_BYTES", 11 * 37 * 2)


@pytest.mark.parametrize("passes", [False, True])
@pytest.mark.parametrize("chunk_bytes", [None, 1000, 7 * 2 * 300])
def test_transposed_bf16_weight_read_and_converted(tmp_path, monkeypatch, chunk_bytes, passes):
    """A checkpoint's bf16 [K, N] weight read as its transpose [N, K] (make export's route), in whole-matrix
    and partial-column chunks (a short last one too), gathered from one map of the source or, as a large
    one (an untied lm_head), in passes over it: the values are the transpose, bit for bit, and the fp16
    conversion is numpy's of the widened values (edge values: overflow to inf, subnormals, NaN)."""
    if passes:
        _in_passes(monkeypatch)
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((300, 37)) * 10 ** rng.uniform(-8, 5, (300, 37))).astype(np.float32)
    w.reshape(-1)[:EDGES.size] = EDGES
    bits = _bf16_bits(w)
    t = _external(tmp_path, "w", bits, data_type=TensorProto.BFLOAT16)
    t.doc_string = stream.TRANSPOSED + "1,0"
    del t.dims[:]
    t.dims.extend([37, 300])
    got = np.concatenate([c.copy() for c in stream.chunks(t, tmp_path, chunk_bytes=chunk_bytes)])
    assert np.array_equal(got, bits.T.reshape(-1))
    if chunk_bytes is not None:
        return
    half = np.concatenate([c.copy() for c in stream.converted(t, tmp_path, TensorProto.FLOAT16)])
    with np.errstate(over="ignore"):
        want = (bits.T.astype(np.uint32) << 16).view(np.float32).astype(np.float16)
    assert np.array_equal(half.view(np.uint16), want.reshape(-1).view(np.uint16))


@pytest.mark.parametrize("transposed", [False, True, "in passes"])
def test_chunks_of_truncated_external_data_fail_with_the_tensor_name(tmp_path, monkeypatch, transposed):
    arr = np.arange(10_000, dtype=np.float32)
    t = _external(tmp_path, "w", arr)
    if transposed == "in passes":
        _in_passes(monkeypatch)
    if transposed:  # read through a map of the whole tensor (a weight written transposed), or in passes
        t.doc_string = stream.TRANSPOSED + "1,0"
        del t.dims[:]
        t.dims.extend([100, 100])
    with open(tmp_path / "w.bin", "r+b") as fh:
        fh.truncate(128 + 5000 * 4)
    with pytest.raises(OSError, match="external data of 'w' ends early in w.bin"):
        for _ in stream.chunks(t, tmp_path, chunk_bytes=4096):
            pass


def test_write_tensor_converts_in_chunks_with_little_memory(tmp_path, monkeypatch):
    """A 24 MB fp32 tensor through 1 MB chunks: the peak stays a few chunks, not the tensor (x1.5)."""
    monkeypatch.setattr(stream, "CHUNK_BYTES", 1 << 20)
    arr = np.random.default_rng(1).standard_normal((1536, 4096)).astype(np.float32)
    t = _external(tmp_path, "w", arr)
    del arr
    tracemalloc.start()
    with open(tmp_path / "out.bin", "wb") as fh:
        n = stream.write_tensor(t, tmp_path, TensorProto.FLOAT16, fh)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 6 << 20
    expect = np.fromfile(tmp_path / "w.bin", np.float32, offset=128, count=1536 * 4096).astype(np.float16)
    assert n == expect.nbytes and np.array_equal(np.fromfile(tmp_path / "out.bin", np.float16), expect)


@pytest.mark.parametrize("want,scale", [(TensorProto.FLOAT16, None), (TensorProto.FLOAT, None),
                                        (TensorProto.FLOAT16, 8.0)])
def test_safetensors_byte_identical_to_the_library(tmp_path, monkeypatch, want, scale):
    from safetensors.numpy import save_file

    monkeypatch.setattr(stream, "CHUNK_BYTES", 4096)
    table = np.random.default_rng(2).standard_normal((333, 24)).astype(np.float32)
    bits = _bf16_bits(table)
    t = _external(tmp_path, "emb", bits, data_type=TensorProto.BFLOAT16)
    stream.write_safetensors(tmp_path / "ours.safetensors", "embedding", t, tmp_path, want, scale=scale)
    ref = (bits.astype(np.uint32) << 16).view(np.float32) * np.float32(scale or 1.0)
    save_file({"embedding": ref.astype(helper.tensor_dtype_to_np_dtype(want))}, str(tmp_path / "lib.safetensors"))
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "lib.safetensors").read_bytes()


def test_async_writer_reports_write_errors(tmp_path):
    class Broken:
        def write(self, b):
            raise OSError(28, "No space left on device")

        def close(self):
            pass

    w = stream.AsyncWriter(Broken())
    with pytest.raises(OSError, match="No space"):
        for _ in range(10):
            w.write(b"x" * 100)
        w.close()


@pytest.mark.parametrize("external", [True, False])
def test_save_streams_external_weights(tmp_path, external):
    """graph.save on a model whose big weight is external: converted, aligned, loadable, checker-clean."""
    src = tmp_path / "src"
    src.mkdir()
    w = np.random.default_rng(3).standard_normal((300, 256)).astype(np.float32)  # > SMALL_TENSOR_ELEMENTS
    t = _external(src, "W", w)
    small = numpy_helper.from_array(np.array([1, 256], np.int64), "s")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y0"]), helper.make_node("Reshape", ["y0", "s"], ["y"])]
    g = helper.make_graph(nodes,
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 300])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 256])], initializer=[t, small])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    out = tmp_path / "out"
    out.mkdir()
    files = graphio.save(model, out / "model.onnx", src, TensorProto.FLOAT16, external, narrow={"W"})
    assert files == (["model.onnx", "model.onnx.data"] if external else ["model.onnx"])
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    by_name = {i.name: i for i in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer}
    assert (by_name["W"].data_location == TensorProto.EXTERNAL) == external
    assert by_name["s"].data_location != TensorProto.EXTERNAL  # small constants stay inline
    if external:
        assert int({e.key: e.value for e in by_name["W"].external_data}["offset"]) % graphio.ALIGN == 0
    loaded = {i.name: i for i in onnx.load(str(out / "model.onnx")).graph.initializer}
    assert np.array_equal(numpy_helper.to_array(loaded["W"]), w.astype(np.float16))


def test_mask_probe_runs_once_for_all_layers(models, monkeypatch):
    """Every layer shares one mask and one position path: one onnxruntime session each, not one per layer
    (the old probe copied the whole graph per layer: 7 s of a 24-layer rewrite)."""
    import onnxruntime as ort

    from onnx_rewriter.pipeline import steps as pipeline

    sessions = []
    real = ort.InferenceSession

    def counting(*a, **kw):
        sessions.append(1)
        return real(*a, **kw)

    base = models.baseline("llama", num_hidden_layers=4)
    run = pipeline.Run(in_path=base, out_dir=None, options=pipeline.Options())
    for step in pipeline.STEPS[:4]:
        step(run)
    monkeypatch.setattr(ort, "InferenceSession", counting)
    pipeline.step_check(run)
    assert len(run.layers) == 4 and len(sessions) <= 2


def test_tokenizer_child_writes_what_in_process_writes(models, tmp_path):
    from onnx_rewriter.sidefiles import tokenizer_job

    tok_dir = models.checkpoint("llama")
    (tmp_path / "child").mkdir()
    (tmp_path / "here").mkdir()
    job = tokenizer_job.Job(tok_dir, "processed_chat_template.json")
    child = job.result(tmp_path / "child")
    here = tokenizer_job.write_tokenizer_side_files(tok_dir, "processed_chat_template.json", tmp_path / "here")
    assert child == here and len(here) == 4
    for name in here:
        assert (tmp_path / "child" / name).read_bytes() == (tmp_path / "here" / name).read_bytes(), name
    empty = tmp_path / "empty"
    empty.mkdir()
    assert tokenizer_job.Job(empty, "chat_template.jinja").result(tmp_path / "child") is None
    dropped = tokenizer_job.Job(tok_dir, "chat_template.jinja")  # a failed rewrite: the child is stopped
    dropped.close()
    assert dropped.proc.returncode is not None


def test_tokenizer_child_started_early_is_taken_over_or_stopped(models, tmp_path, monkeypatch):
    """The CLI starts the child before its imports (start_early); the pipeline's start() for the same files
    takes that child over, and one nobody took is stopped (drop_early)."""
    import sys

    from onnx_rewriter.sidefiles import tokenizer_job

    tok_dir = models.checkpoint("llama")  # (may import transformers: building it does)
    # as in the CLI: a child, not in-process (run first in a session, transformers is not imported yet)
    monkeypatch.delitem(sys.modules, "transformers", raising=False)
    tokenizer_job.start_early(tok_dir, "processed_chat_template.json")
    early = tokenizer_job._EARLY[(str(tok_dir), "processed_chat_template.json", False)]
    other = tokenizer_job.start(tok_dir, "chat_template.jinja")  # other files: a child of its own
    assert other is not early
    other.close()
    assert tokenizer_job.start(tok_dir, "processed_chat_template.json") is early and not tokenizer_job._EARLY
    assert len(early.result(tmp_path)) == 4
    tokenizer_job.start_early(tok_dir, "chat_template.jinja")
    left = tokenizer_job._EARLY[(str(tok_dir), "chat_template.jinja", False)]
    tokenizer_job.drop_early()
    assert left.proc.returncode is not None and not tokenizer_job._EARLY


def test_tokenizer_child_reports_a_broken_tokenizer(tmp_path):
    from onnx_rewriter.errors import RewriteError
    from onnx_rewriter.sidefiles import tokenizer_job

    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(RewriteError, match="cannot load the tokenizer"):
        tokenizer_job.Job(tmp_path, "chat_template.jinja").result(tmp_path)


def test_progress_bars_only_on_a_terminal(monkeypatch, capsys):
    from onnx_rewriter import progress

    monkeypatch.setattr(progress, "_quiet", False)
    assert not progress.enabled()  # pytest captures stderr: not a TTY
    with progress.bar(total=3) as pb:
        pb.update()
    with progress.stages(["a", "b"], "x") as advance:
        advance("a")
        advance("b")
    assert capsys.readouterr().err == ""


def test_summary_lists_sizes(tmp_path):
    from onnx_rewriter.cli import _sizes

    (tmp_path / "model.onnx").write_bytes(b"x" * 2048)
    (tmp_path / "model.onnx.data").write_bytes(b"x" * 3_000_000)
    text = _sizes(tmp_path, ["model.onnx", "model.onnx.data"])
    assert text == "model.onnx 2.0 kB, model.onnx.data 3.0 MB; 3.0 MB in all"


def _unoptimized(ckpt):
    import torch

    from onnx_rewriter.hf.export import _LogitsOnly, load_model

    model, _ = load_model(str(ckpt))
    ids = torch.ones((2, 8), dtype=torch.int64)
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=32768)
    with torch.no_grad():
        return torch.onnx.export(_LogitsOnly(model).eval(), (ids, torch.ones_like(ids)), dynamo=True, optimize=False,
                                 dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
                                 input_names=["input_ids", "attention_mask"], output_names=["logits"])


def _nodes(model: onnx.ModelProto) -> list:
    return [(n.op_type, list(n.input), list(n.output), [a.SerializeToString() for a in n.attribute])
            for n in model.graph.node]


@pytest.mark.parametrize("family", ["llama", pytest.param("phi3", marks=pytest.mark.slow),
                                    pytest.param("gemma3", marks=pytest.mark.slow)])
def test_lean_optimize_gives_the_default_graph(models, family):
    """export._optimize drops onnxscript's multi-output rules (quadratic in graph size): same nodes."""
    import copy

    from onnx_rewriter.hf.trace import _optimize

    prog = _unoptimized(models.checkpoint(family))
    other = copy.copy(prog)
    other.model = __import__("onnx_ir").from_proto(prog.model_proto)
    prog.optimize()
    _optimize(other)
    assert _nodes(prog.model_proto) == _nodes(other.model_proto)


def test_inline_save_streams_weights_into_one_readable_file(tmp_path, monkeypatch):
    """Inline output (no --external-data): weights are appended to model.onnx as extra `graph { initializer }`
    records, never held in memory; onnx and onnxruntime read back exactly what onnx.save_model would give."""
    import onnxruntime as ort

    monkeypatch.setattr(stream, "CHUNK_BYTES", 1 << 16)
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(4)
    w1 = rng.standard_normal((300, 256)).astype(np.float32)
    w2 = rng.standard_normal((256, 300)).astype(np.float32)
    raw = b""
    inits = []
    for name, arr in (("W1", w1), ("W2", w2)):
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=arr.shape, data_location=TensorProto.EXTERNAL)
        for k, v in (("location", "w.bin"), ("offset", str(len(raw))), ("length", str(arr.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        raw += arr.tobytes()
        inits.append(t)
    (src / "w.bin").write_bytes(raw)
    bias = numpy_helper.from_array(np.arange(300, dtype=np.float16), "b")
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("MatMul", ["h", "W2"], ["y0"]),
             helper.make_node("Add", ["y0", "b"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 300])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 300])],
                          initializer=[inits[0], bias, inits[1]])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    out = tmp_path / "out"
    out.mkdir()
    assert graphio.save(model, out / "model.onnx", src, TensorProto.FLOAT16, False, narrow={"W1", "W2"}) == \
        ["model.onnx"]
    graphio.check(out / "model.onnx")  # through the skeleton ...
    assert [p.name for p in out.iterdir()] == ["model.onnx"]
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)  # ... and the whole file
    loaded = onnx.load(str(out / "model.onnx"))
    got = {i.name: numpy_helper.to_array(i) for i in loaded.graph.initializer}
    assert sorted(got) == ["W1", "W2", "b"] and len(loaded.graph.node) == 3
    assert np.array_equal(got["W1"], w1.astype(np.float16)) and np.array_equal(got["W2"], w2.astype(np.float16))
    x = rng.standard_normal((2, 300)).astype(np.float16)
    y = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref = (x.astype(np.float32) @ got["W1"].astype(np.float32) @ got["W2"].astype(np.float32)) + np.arange(300)
    assert np.allclose(y.astype(np.float32), ref, rtol=2e-2, atol=0.5)


def test_onnxscript_rules_are_tried_by_root_op():
    """The optimizer's rules are tried only on nodes of their root op type (export._RootOpRule): if onnxscript's
    internals move, the prefilter is dropped silently (every node tried, ~4 s more per 0.5B export); say so."""
    from onnxscript import rewriter

    from onnx_rewriter.hf.trace import _by_root_op, _RootOpRule

    single = [r for r in rewriter._DEFAULT_REWRITE_RULES if r._target_pattern.has_single_output_node]
    wrapped = [w for w in map(_by_root_op, single) if isinstance(w, _RootOpRule)]
    constant_roots = [r for r in single if r._target_pattern.output_node.op_identifier() is not None]
    assert len(wrapped) == len(constant_roots) == 43
    assert {w._op_type for w in wrapped} >= {"Reshape", "Transpose", "Cast", "Unsqueeze", "Mul", "Add"}
