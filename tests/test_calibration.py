"""Calibration runs the baseline in onnxruntime segment by segment (calibration.Baseline): the values it
reads are bit for bit those of the whole baseline in one session with the tensors added as outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_rewriter.features import calibration

DIMS = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=8)
PROMPTS = [[5, 17, 99, 3, 250, 7, 7, 41], [300, 2, 11], list(range(20, 60, 3))]


@pytest.fixture(scope="module")
def external_baseline(models, tmp_path_factory):
    """A tiny Qwen2 baseline with every weight in an external file (as real exports are): the embedding
    Gather is then read from the memory map."""
    path = tmp_path_factory.mktemp("cal") / "model.onnx"
    model = onnx.load(str(models.baseline("qwen2", **DIMS)))
    onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    return path


def _wanted(path):
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    names = [n.input[0] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    return list(dict.fromkeys(names)) + [n.output[0] for n in model.graph.node if n.op_type == "Softmax"]


def _one_session(path, names):
    """What calibration ran before segments: the whole baseline, the tensors added as graph outputs."""
    model = onnx.load(str(path))
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    out = []
    for ids in PROMPTS:
        feeds = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
        out.append(dict(zip(names, sess.run(names, {i.name: feeds[i.name] for i in sess.get_inputs()}))))
    return out


@pytest.mark.parametrize("segment_bytes, segments", [(1, 11), (1 << 40, 1)])
def test_segments_read_the_values_of_one_session(external_baseline, monkeypatch, segment_bytes, segments):
    names = _wanted(external_baseline)
    assert len(names) == 11  # 2 layers x (q/k/v, o, gate/up, down inputs; attention probabilities) + lm_head input
    monkeypatch.setattr(calibration, "SEGMENT_BYTES", segment_bytes)
    base = calibration.Baseline(external_baseline, names)
    assert len(base.segments) == segments and len(base.row_reads) == 1
    want = _one_session(external_baseline, names)
    seen = []
    for p, out in base.run(PROMPTS):
        for name, value in out.items():
            seen.append((p, name))
            assert value.dtype == want[p][name].dtype and np.array_equal(value, want[p][name]), (p, name)
    assert sorted(seen) == sorted((p, n) for p in range(len(PROMPTS)) for n in names)


def test_graph_is_cut_to_what_the_tensors_need(external_baseline):
    full = onnx.load(str(external_baseline), load_external_data=False)
    first_o = _wanted(external_baseline)[1]  # layer 0's attention output (o_proj's input)
    base = calibration.Baseline(external_baseline, [first_o])
    ops = [n.op_type for s in base.segments for n in s.nodes] + [n.op_type for n in base.row_reads]
    assert ops.count("Softmax") == 1 and ops.count("MatMul") == 5  # q, k, v, q @ k, p @ v
    assert len(ops) < len(full.graph.node) / 2
    assert [o.name for o in base.model.graph.output] == [first_o]


def test_lean_runs_stream_big_matmuls_in_groups_of_prompts(external_baseline, monkeypatch):
    """Lean runs (the W+A calibration): every MatMul by an external weight of at least STREAM_MATMUL_BYTES runs
    in numpy from blocks of the weight's rows, and prompts go through in groups of up to GROUP_TOKENS tokens.
    Each value still comes once per prompt and equals one session's to fp32 summation-order rounding."""
    names = _wanted(external_baseline)
    monkeypatch.setattr(calibration, "STREAM_MATMUL_BYTES", 1)
    monkeypatch.setattr(calibration, "STREAM_BLOCK_BYTES", 40 * 256 * 4)  # 40 rows of a [128, 256] weight: 4 blocks
    monkeypatch.setattr(calibration, "STREAM_COLUMNS", 100)  # partial products of 100, 100 and 56 columns
    monkeypatch.setattr(calibration, "GROUP_TOKENS", 12)  # PROMPTS of 8, 3 and 14 tokens: groups [0, 1], [2]
    base = calibration.Baseline(external_baseline, names, segment_bytes=1, lean=True)
    streamed = [s.nodes[0].name for s in base.segments if s.streamed]
    assert len(streamed) == 2 * 7  # q, k, v, o, gate, up, down per layer (lm_head is cut: no wanted tensor needs it)
    want = _one_session(external_baseline, names)
    seen = []
    for p, out in base.run(PROMPTS):
        for name, value in out.items():
            seen.append((p, name))
            assert value.dtype == want[p][name].dtype
            np.testing.assert_allclose(value, want[p][name], rtol=1e-4, atol=1e-5, err_msg=f"{p} {name}")
    assert sorted(seen) == sorted((p, n) for p in range(len(PROMPTS)) for n in names)
    assert [p for p, _ in seen[:2]] == [0, 1]  # the first group's prompts, before the second's
