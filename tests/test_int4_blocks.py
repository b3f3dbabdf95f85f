"""INT4 quantized in bounded blocks (int4_layout.rtn_packed): byte for byte the whole-matrix RTN and packing,
so the peak memory does not follow the largest weight while the output stays the same."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_rewriter.features.int4 import awq as int4_awq
from onnx_rewriter.features.int4 import layout as int4_layout
from onnx_rewriter.modelio import graph as graphio
from onnx_rewriter.pipeline import steps as pipeline

RNG = np.random.default_rng(7)


def _weight(k, n):
    w = RNG.standard_normal((k, n)).astype(np.float32) * 0.05
    w[:, 3] *= 40  # an outlier column: its groups get other scales than their neighbours
    w[128:256] = 0  # an all-zero group (scale 1)
    return w.astype(np.float16)


@pytest.mark.parametrize("version, k, n", [(1, 384, 136), (1, 512, 8), (2, 384, 200), (2, 640, 64)])
@pytest.mark.parametrize("rows", [128, 256, 384])
def test_blocks_equal_whole_matrix(version, k, n, rows):
    w = _weight(k, n)
    u, scales = int4_layout.rtn(w)
    blocks = ((k0, w[k0:k0 + rows]) for k0 in range(0, k, rows))
    qweight, got_scales = int4_layout.rtn_packed(blocks, k, n, version)
    assert qweight.tobytes() == int4_layout.PACKERS[version][0](u).tobytes()
    assert got_scales.tobytes() == scales.tobytes()


def test_blocks_must_continue_in_whole_groups():
    w = _weight(256, 64)
    with pytest.raises(ValueError, match="does not continue"):
        int4_layout.rtn_packed([(0, w[:64]), (64, w[64:])], 256, 64, 1)
    with pytest.raises(ValueError, match="cover 128 of 256"):
        int4_layout.rtn_packed([(0, w[:128])], 256, 64, 1)


def test_block_rows():
    assert int4_layout.block_rows(8960) == 128  # 4.6 MB of fp32 a block
    assert int4_layout.block_rows(896) == 1152
    assert int4_layout.block_rows(1 << 20) == 128  # never less than one group


@pytest.mark.parametrize("version", [1, 2])
def test_awq_blocks_equal_whole_matrix(version, monkeypatch):
    monkeypatch.setattr(int4_layout, "BLOCK_BYTES", 1)  # one group a block
    w = _weight(512, 128)
    s = np.exp2(RNG.integers(-3, 4, 512)).astype(np.float32)
    u, scales = int4_awq.quantize(w, s)
    qweight, got_scales = int4_awq.quantize_packed(w, s, version)
    assert qweight.tobytes() == int4_layout.PACKERS[version][0](u).tobytes()
    assert got_scales.tobytes() == scales.tobytes()


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("target", ["edgellm-0.9", "edgellm-0.11"])
def test_rewrite_in_blocks_is_byte_identical(models, tmp_path, monkeypatch, target):
    """The folder written one group at a time equals the one written a whole weight at a time. The small-
    tensor limit is lowered so every qweight takes the writer's external path (written straight from the
    producer, not through raw_data)."""
    base = models.baseline("qwen2", hidden_size=128, intermediate_size=384, num_attention_heads=8,
                           num_key_value_heads=8)
    monkeypatch.setattr(graphio, "SMALL_TENSOR_ELEMENTS", 1024)
    blocks = []
    rtn = int4_layout.rtn
    monkeypatch.setattr(int4_layout, "rtn", lambda w, group=128: (blocks.append(w.shape[0]), rtn(w, group))[1])
    outs = {}
    for name, nbytes in (("whole", 1 << 40), ("groups", 1)):
        monkeypatch.setattr(int4_layout, "BLOCK_BYTES", nbytes)
        blocks.clear()
        pipeline.rewrite(base, tmp_path / name, target=target, quantize="int4", external_data=True)
        outs[name] = (_files(tmp_path / name), list(blocks))
    # 2 layers x (q, k, v, o, gate, up: K = 128; down: K = 384)
    assert outs["whole"][1] == [128] * 6 + [384] + [128] * 6 + [384]
    assert outs["groups"][1] == ([128] * 6 + [128] * 3) * 2
    assert sorted(outs["whole"][0]) == sorted(outs["groups"][0])
    assert "model.onnx.data" in outs["whole"][0]
    for name, data in outs["whole"][0].items():
        assert outs["groups"][0][name] == data, name


@pytest.mark.parametrize("external", [False, True])
def test_quantized_weights_are_made_one_at_a_time(models, tmp_path, monkeypatch, external):
    """Each computed (INT4) weight is produced when the writer reaches it, also in the default inline
    model.onnx, where they were all made up front into raw_data (0.5B: an 847 MB peak against 145 MB): between
    two large products the writer must have written something, and every product is freed once written."""
    import weakref

    from onnx_rewriter.modelio import stream

    base = models.baseline("qwen2", hidden_size=128, intermediate_size=384, num_attention_heads=8,
                           num_key_value_heads=8)
    monkeypatch.setattr(graphio, "SMALL_TENSOR_ELEMENTS", 1024)
    written, seen, alive = [0], [], []
    produce_blocks, commit = stream.produce_blocks, stream.AsyncWriter.commit

    def counting(self, buf, n):
        written[0] += n
        commit(self, buf, n)

    def tracked(t):
        for arr in produce_blocks(t):
            if arr.size > 1024:
                alive[:] = [r for r in alive if r() is not None]
                seen.append((written[0], len(alive)))
                alive.append(weakref.ref(arr))
            yield arr

    monkeypatch.setattr(stream.AsyncWriter, "commit", counting)
    monkeypatch.setattr(stream, "produce_blocks", tracked)
    pipeline.rewrite(base, tmp_path / "out", target="edgellm-0.9", quantize="int4", external_data=external)
    assert len(seen) == 14, seen  # 2 layers x 7 linears: one qweight each
    assert all(a < b for (a, _), (b, _) in zip(seen, seen[1:])), seen
    assert all(n == 0 for _, n in seen), seen


def _lazy(proto):
    return graphio.lazy_constant(proto.name, proto)


def _external(tmp_path, name, arr, data_type, dims, doc=""):
    from onnx import TensorProto

    path = tmp_path / f"{name}.bin"
    path.write_bytes(np.ascontiguousarray(arr).tobytes())
    t = TensorProto(name=name, data_type=data_type, dims=list(dims), doc_string=doc,
                    data_location=TensorProto.EXTERNAL)
    for k, v in (("location", path.name), ("offset", "0"), ("length", str(path.stat().st_size))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def test_row_blocks_read_every_storage_as_the_whole_array(tmp_path):
    """constant_row_blocks gives the rows constant_array gives, in fp16, for each way a weight is stored:
    external, external read transposed, bf16 bits, q/k/v concatenated, inline, plain numpy."""
    import onnx_graphsurgeon as gs
    from onnx import TensorProto, numpy_helper

    from onnx_rewriter.modelio import stream

    k, n = 384, 96
    w = RNG.standard_normal((k, n)).astype(np.float32)
    bf16 = (w.view(np.uint32) >> 16).astype(np.uint16)  # truncated to bf16 bits
    left = _external(tmp_path, "left", w[:, :64], TensorProto.FLOAT, (k, 64))
    right = _external(tmp_path, "right", w[:, 64:], TensorProto.FLOAT, (k, 32))
    cases = {
        "external": _lazy(_external(tmp_path, "plain", w, TensorProto.FLOAT, (k, n))),
        "transposed": _lazy(_external(tmp_path, "t", w.T, TensorProto.FLOAT, (k, n), stream.TRANSPOSED + "1,0")),
        "bf16": _lazy(_external(tmp_path, "bf16", bf16, TensorProto.BFLOAT16, (k, n))),
        "concat": _lazy(stream.concatenated("qkv", [left, right])),
        "inline": _lazy(numpy_helper.from_array(w, "inline")),
        "numpy": gs.Constant("np", w),
    }
    for name, c in cases.items():
        want = graphio.constant_array(c, tmp_path).astype(np.float16)
        blocks = list(graphio.constant_row_blocks(c, tmp_path, 128))
        assert [r for r, _ in blocks] == [0, 128, 256], name
        got = np.concatenate([b for _, b in blocks])
        assert got.dtype == np.float16 and np.array_equal(got, want), name
    assert np.array_equal(graphio.constant_array(cases["transposed"], tmp_path), w)
