"""The fast export route: light decomposition (lowering.py), weights referenced in the checkpoint
(checkpoint_refs.py) and weight transposes folded while writing (normalize.fold_weight_transposes).
Each must give what torch's own route gives, or step aside."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from onnx_rewriter.hf import checkpoint_refs, lowering  # noqa: E402
from onnx_rewriter.hf.export import _LogitsOnly, export_baseline, load_model  # noqa: E402


def _ort_logits(path, ids):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]


def _torch_logits(model, ids):
    with torch.no_grad():
        t = torch.from_numpy(ids)
        return model(input_ids=t, attention_mask=torch.ones_like(t), use_cache=False).logits.float().numpy()


IDS = np.array([[3, 17, 5, 9, 22, 4], [8, 1, 30, 2, 2, 11]], dtype=np.int64)


def test_decoder_training_ir_lowers_by_renaming(models):
    from torch.onnx._internal.exporter import _registration

    model, _ = load_model(str(models.checkpoint("llama")))
    ids = torch.ones((2, 8), dtype=torch.int64)
    with torch.no_grad():
        program = torch.export.export(_LogitsOnly(model), (ids, torch.ones_like(ids)), strict=False)
    registry = _registration.ONNXRegistry.from_torchlib()
    assert lowering.lower(program, registry)
    left = {str(n.target) for n in program.graph.nodes if n.op == "call_function"
            and not registry.is_registered(n.target) and "assert" not in str(n.target)}
    assert left == set()


ALL = ["llama", "llama_tied", "smollm", "llama3", "qwen2", "qwen3", "mistral", "mistral_window", "phi3", "gemma",
       "gemma2", "gemma3"]
FAST = ("llama", "qwen3", "phi3", "gemma", "gemma3")


@pytest.mark.parametrize("family", [f if f in FAST else pytest.param(f, marks=pytest.mark.slow) for f in ALL])
def test_light_route_gives_torchs_graph(models, tmp_path, family, monkeypatch):
    """Skipping torch's retrace (and its type-promotion rerun when no cast is due) changes nothing in the
    graph: the same ops, in the same order, less at most a Reshape to the shape its input already has
    (which the retrace does not always see through)."""
    import contextlib
    import difflib
    import importlib

    export = importlib.import_module("onnx_rewriter.hf.export")
    model, _ = load_model(str(models.checkpoint(family)))
    light = export_baseline(model, tmp_path / "light.onnx")
    monkeypatch.setattr(export, "_light_decomposition", contextlib.nullcontext)
    full = export_baseline(model, tmp_path / "full.onnx")
    ops = [[n.op_type for n in onnx.load(str(p), load_external_data=False).graph.node] for p in (light, full)]
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, ops[0], ops[1], autojunk=False).get_opcodes():
        assert tag == "equal" or (tag == "insert" and set(ops[1][j1:j2]) <= {"Reshape", "Concat"}), \
            (tag, ops[0][i1:i2], ops[1][j1:j2])
    # the same op types could still compute something else (an attribute, a constant): compare the numbers
    np.testing.assert_allclose(_ort_logits(light, IDS), _ort_logits(full, IDS), rtol=1e-5, atol=1e-5)


def test_mutating_op_falls_back_to_torch_decomposition(tmp_path):
    from torch.onnx._internal.exporter import _registration

    class InPlace(torch.nn.Module):
        def forward(self, x):
            y = x.clone()
            y.add_(1.0)
            return y * 2

    x = torch.randn(2, 3)
    program = torch.export.export(InPlace(), (x,), strict=False)
    before = [str(n.target) for n in program.graph.nodes]
    assert not lowering.lower(program, _registration.ONNXRegistry.from_torchlib())
    assert [str(n.target) for n in program.graph.nodes] == before  # untouched: torch's step runs instead


def test_type_promotion_check_sees_a_due_cast():
    class Mixed(torch.nn.Module):
        def forward(self, x):
            return x + x.to(torch.float16)  # fp32 + fp16: torch's pass casts the fp16 side

    class Plain(torch.nn.Module):
        def forward(self, x):
            return x * x + x

    x = torch.randn(2, 3)
    assert lowering.needs_type_promotion(torch.export.export(Mixed(), (x,), strict=False).graph_module)
    assert not lowering.needs_type_promotion(torch.export.export(Plain(), (x,), strict=False).graph_module)


def test_baseline_references_only_identical_checkpoint_bytes(models, tmp_path):
    ckpt = models.checkpoint("qwen2")
    model, _ = load_model(str(ckpt))
    with torch.no_grad():  # a weight that no longer matches the file must be saved, not referenced
        model.model.norm.weight.add_(0.5)
    path = export_baseline(model, tmp_path / "model.onnx", checkpoint=checkpoint_refs.checkpoint_files(str(ckpt)))
    proto = onnx.load(str(path), load_external_data=False)
    where = {t.name: {e.key: e.value for e in t.external_data}.get("location") for t in proto.graph.initializer}
    assert sum(loc == "checkpoint-0.safetensors" for loc in where.values()) >= 10
    assert where.get("m.model.norm.weight") != "checkpoint-0.safetensors"
    np.testing.assert_allclose(_ort_logits(path, IDS), _torch_logits(model, IDS), atol=1e-4, rtol=1e-4)


def test_weight_transposes_fold_while_writing(models, tmp_path):
    from onnx_rewriter import rewrite

    ckpt = models.checkpoint("llama")
    model, _ = load_model(str(ckpt))
    base = export_baseline(model, tmp_path / "base" / "model.onnx",
                           checkpoint=checkpoint_refs.checkpoint_files(str(ckpt)))
    models.copy_side_files(ckpt, tmp_path / "base")
    unfolded = [n for n in onnx.load(str(base), load_external_data=False).graph.node if n.op_type == "Transpose"
                and n.input[0].startswith("m.")]
    assert unfolded, "the baseline keeps the checkpoint's layout"
    for external in (False, True):
        out = tmp_path / f"out-{external}"
        rewrite(base, out, dtype="float32", external_data=external)
        proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
        inits = {t.name for t in proto.graph.initializer}
        assert not [n for n in proto.graph.node if n.op_type == "Transpose" and n.input[0] in inits]
        assert not [t.name for t in proto.graph.initializer if t.doc_string]
        # The folded weight holds the transposed values of the checkpoint's.
        full = onnx.load(str(out / "model.onnx"))
        w = next(onnx.numpy_helper.to_array(t) for t in full.graph.initializer
                 if tuple(t.dims) == tuple(model.lm_head.weight.shape[::-1]))
        np.testing.assert_array_equal(w, model.lm_head.weight.detach().numpy().T)



def test_unlinkable_checkpoint_is_copied(models, tmp_path, monkeypatch):
    """No hard or symbolic link possible (another filesystem, no permission): the weights are copied."""
    def refuse(*_):
        raise PermissionError("not here")

    monkeypatch.setattr(checkpoint_refs.os, "link", refuse)
    monkeypatch.setattr(checkpoint_refs.os, "symlink", refuse)
    ckpt = models.checkpoint("qwen2")
    model, _ = load_model(str(ckpt))
    path = export_baseline(model, tmp_path / "model.onnx", checkpoint=checkpoint_refs.checkpoint_files(str(ckpt)))
    proto = onnx.load(str(path), load_external_data=False)
    assert not [t.name for t in proto.graph.initializer
                if any(e.value.startswith("checkpoint-") for e in t.external_data)]
    np.testing.assert_allclose(_ort_logits(path, IDS), _torch_logits(model, IDS), atol=1e-4, rtol=1e-4)
