"""Calibration: a small prompt set run through the baseline ONNX with onnxruntime, reading the tensors a
feature needs (today: each layer's K and V for the FP8 KV cache scales).

The baseline is run as exported (no rewrite), with the wanted intermediate tensors added as graph outputs;
its weights stay where they are (memory-mapped from the baseline's files, never copied beside it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from onnx_rewriter.errors import RewriteError
from onnx_rewriter.modelio import stream
from onnx_rewriter.modelio.graph import convert_float
from onnx_rewriter.reference import fp8
from onnx_rewriter.reference.plugin import apply_rope
from onnx_rewriter.sidefiles.writer import tokenizer_dir
from onnx_rewriter.targets.base import layer_rope_table

# The bundled calibration set: short, varied English prompts (chat, code, lists, numbers). Kept tiny so
# calibration costs a few forward passes; `--calibration FILE` (one prompt a line) replaces it.
DEFAULT_PROMPTS = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Explain in two sentences why the sky looks blue during the day and red at sunset.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
    "Shopping list: eggs, milk, flour, two apples, a loaf of bread, coffee beans and olive oil.",
    "Q: What is 17 multiplied by 23? A: 17 times 23 equals 391, because 17 * 20 = 340 and 17 * 3 = 51.",
    "Dear team, the meeting moved to Thursday at 3 pm; please bring the quarterly figures.",
    "In 1969 the Apollo 11 mission landed two astronauts on the Moon and returned them safely.",
    "Translate to French: Good morning, how are you today? I would like a cup of tea, please.",
)
MAX_TOKENS = 64  # per prompt: K/V ranges settle within a few dozen tokens


def prompts(path: str | None) -> list[str]:
    if path is None:
        return list(DEFAULT_PROMPTS)
    try:
        lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise RewriteError(f"--calibration '{path}': cannot read it ({exc}); give a text file, one prompt a line") \
            from None
    lines = [ln for ln in lines if ln]
    if not lines:
        raise RewriteError(f"--calibration '{path}' holds no prompt; give a text file, one prompt a line")
    return lines


def token_rows(run, texts: list[str]) -> list[list[int]]:
    """The prompts as token ids, through the tokenizer.json the rewrite writes beside the model."""
    from tokenizers import Tokenizer

    path = tokenizer_dir(run) / "tokenizer.json"
    if not path.is_file():
        raise RewriteError(f"calibration needs the model's tokenizer: no tokenizer.json in '{path.parent}' "
                           f"(pass --tokenizer DIR)")
    tok = Tokenizer.from_file(str(path))
    vocab = int(run.spec.get("vocab_size") or 0)
    rows = []
    for text in texts:
        ids = tok.encode(text).ids[:MAX_TOKENS]
        if ids and (not vocab or max(ids) < vocab):
            rows.append(ids)
    if not rows:
        raise RewriteError("calibration: no prompt gave tokens inside the model's vocabulary")
    return rows


# Weight bytes per onnxruntime session: onnxruntime copies every initializer it is given (the memory-mapped
# files included), so the baseline runs in segments of about this much, one session alive at a time.
SEGMENT_BYTES = 64 << 20
# Lean runs: a MatMul by an external weight of at least this many bytes runs in numpy instead, the weight read
# from the file a block of rows at a time (stream.chunks) and never whole: at 1.5B dims one MLP weight is 55 MB
# of fp32, which onnxruntime's copy plus the mapped pages doubled (bench/README.md, issue 29).
STREAM_MATMUL_BYTES = 1 << 20
STREAM_BLOCK_BYTES = 2 << 20
STREAM_COLUMNS = 1024  # output columns per partial product (its temporary: tokens x 1024 fp32)
GROUP_TOKENS = 96  # lean runs: prompts per pass through the segments, by their tokens (Baseline.run)


class Baseline:
    """The baseline ONNX run in onnxruntime for the tensors `names` (intermediates), segment by segment.

    Memory (0.5B fp32 baseline: 6.1 GB as one session, bench/README.md): the graph is cut to the nodes those
    tensors need (no lm_head: a tied one is a Transpose of the embedding, which onnxruntime folds into a copy)
    and split after a wanted tensor every SEGMENT_BYTES of weights; the tensors a later segment reads are
    carried per prompt (hidden states, mask, RoPE tables: a few MB). The embedding Gather reads its rows from
    the memory map in numpy (a copy of values either way). Each segment runs the nodes the whole graph runs,
    with the same session settings, so the values are those of one session (tests/test_calibration.py).
    """

    def __init__(self, path: Path, names: list[str], skip_missing: bool = False, segment_bytes: int | None = None,
                 lean: bool = False):
        """`segment_bytes`: weights per session (default SEGMENT_BYTES); `lean`: no MatMul prepacking and no
        memory arena (less memory; the activations' last bits may differ, which ranges do not notice)."""
        model = onnx.load(str(path), load_external_data=False)
        known = {o for n in model.graph.node for o in n.output}
        missing = [n for n in names if n not in known]
        if missing and not skip_missing:
            raise RewriteError(f"calibration: tensor '{missing[0]}' is not in the baseline '{path}' as exported")
        self.names = [n for n in names if n in known]
        _keep_only(model.graph, self.names)
        _inline_small(model.graph, Path(path).parent)
        self.model, self.dir = model, Path(path).parent
        self.inits = {t.name: t for t in model.graph.initializer}
        inputs = {i.name for i in model.graph.input}
        self.row_reads = [n for n in model.graph.node if _row_read(n, self.inits, inputs)]
        nodes = [n for n in model.graph.node if not any(n is r for r in self.row_reads)]
        streamed = {id(n) for n in nodes if lean and _streamed(n, self.inits)}
        self.segments = _segments(nodes, self.inits, set(self.names), segment_bytes or SEGMENT_BYTES, streamed)
        self.lean = lean

    def run(self, rows: list[list[int]]):
        """Yield (prompt index, {name: value}) for every prompt, segment after segment (so each name's
        values come prompt by prompt, in order). Lean runs go through the segments once per group of prompts
        of up to GROUP_TOKENS tokens: the activations carried between segments are a group's, not all
        prompts' (at 1.5B dims the MLP's [tokens, 8960] fp32 intermediates of ~600 tokens were 36 MB)."""
        groups, tokens = [[]], 0
        for i, ids in enumerate(rows):
            if groups[-1] and self.lean and tokens + len(ids) > GROUP_TOKENS:
                groups.append([])
                tokens = 0
            groups[-1].append(i)
            tokens += len(ids)
        for group in filter(None, groups):  # (no prompts: no group)
            for k, out in self._run_group([rows[i] for i in group]):
                yield group[k], out

    def _run_group(self, rows: list[list[int]]):
        import onnxruntime as ort

        graph = self.model.graph
        carried = [_feeds(graph.input, ids) for ids in rows]
        for node in self.row_reads:
            table = stream.mapped(self.inits[node.input[0]], self.dir)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            for values in carried:
                values[node.output[0]] = np.take(table, values[node.input[1]], axis=axis)
            del table
        files = sorted({e.value for t in graph.initializer for e in t.external_data if e.key == "location"})
        for seg in self.segments:
            if seg.streamed:
                yield from self._run_streamed(seg, carried)
                continue
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            if self.lean:
                opts.add_session_config_entry("session.disable_prepacking", "1")
                opts.enable_cpu_mem_arena = False
            # The weights stay in the baseline's files, memory-mapped and handed to onnxruntime by name.
            maps = [np.memmap(self.dir / f, dtype=np.uint8, mode="r") for f in files]
            if files:
                opts.add_external_initializers_from_files_in_memory(files, maps, [m.size for m in maps])
            sub = _submodel(self.model, seg, carried[0])
            sess = ort.InferenceSession(sub.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            del maps, sub
            for i, values in enumerate(carried):
                got = dict(zip(seg.outputs, sess.run(seg.outputs, {n: values[n] for n in seg.inputs})))
                values.update(got)
                yield i, {n: v for n, v in got.items() if n in seg.wanted}
            sess = None
            _drop_unread(carried, seg)


    def _run_streamed(self, seg, carried):
        """One MatMul x @ W in numpy for every prompt, W [K, N] streamed in blocks of rows: fp32 products
        summed block by block (the last bits differ from onnxruntime's order; ranges do not notice)."""
        node = seg.nodes[0]
        w = self.inits[node.input[1]]
        k, n = (int(d) for d in w.dims)
        row_bytes = n * stream.np_dtype(w.data_type).itemsize
        xs = [np.asarray(values[node.input[0]]) for values in carried]
        ys = [np.zeros((*x.shape[:-1], n), np.float32) for x in xs]
        cols = min(n, STREAM_COLUMNS)
        tmp = [np.empty((*x.shape[:-1], cols), np.float32) for x in xs]  # a product's columns before the sum
        start = 0
        for chunk in stream.chunks(w, self.dir, chunk_bytes=max(1, STREAM_BLOCK_BYTES // row_bytes) * row_bytes):
            block = convert_float(chunk, w.data_type, onnx.TensorProto.FLOAT).reshape(-1, n)
            stop = start + block.shape[0]
            for x, y, t in zip(xs, ys, tmp):
                xb = x[..., start:stop].astype(np.float32, copy=False)
                for c in range(0, n, cols):
                    part = t[..., :min(cols, n - c)]
                    np.matmul(xb, block[:, c:c + cols], out=part)
                    y[..., c:c + cols] += part
            start = stop
        del tmp
        if start != k:
            raise RewriteError(f"calibration: weight '{w.name}' streamed {start} of its {k} rows")
        for i, (values, x, y) in enumerate(zip(carried, xs, ys)):
            values[node.output[0]] = y.astype(x.dtype)
            yield i, {o: values[o] for o in seg.outputs if o in seg.wanted}
        _drop_unread(carried, seg)


def _drop_unread(carried: list, seg) -> None:
    """Forget, for every prompt, the values no segment after `seg` reads."""
    for values in carried:
        for name in [name for name in values if name not in seg.later]:
            del values[name]


class _Segment:
    def __init__(self, nodes, inputs, outputs, wanted, later, streamed=False):
        self.nodes, self.inputs, self.outputs, self.wanted, self.later = nodes, inputs, outputs, wanted, later
        self.streamed = streamed  # one MatMul run in numpy (Baseline._run_streamed)


def _streamed(node, inits) -> bool:
    """A MatMul of an activation by a big external 2-D float weight (Baseline._run_streamed runs it)."""
    w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
    return w is not None and node.input[0] not in inits and w.data_location == onnx.TensorProto.EXTERNAL \
        and len(w.dims) == 2 and w.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                 onnx.TensorProto.BFLOAT16) \
        and stream.nbytes(w) >= STREAM_MATMUL_BYTES


def _inline_small(graph: onnx.GraphProto, base_dir: Path) -> None:
    """Small external tensors (axes, shapes) into the proto: onnxruntime's shape inference reads their values
    and cannot from in-memory external data."""
    for t in graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL and stream.numel(t) <= 1024:
            t.raw_data = np.ascontiguousarray(stream.mapped(t, base_dir)).tobytes()
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]


def _row_read(node, inits, inputs) -> bool:
    """A Gather of a float weight by a graph input (the embedding lookup by input_ids)."""
    return node.op_type == "Gather" and node.input[0] in inits and node.input[1] in inputs \
        and inits[node.input[0]].data_location == onnx.TensorProto.EXTERNAL \
        and inits[node.input[0]].data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def _segments(nodes, inits, wanted: set, segment_bytes: int = SEGMENT_BYTES, streamed: set = frozenset()
              ) -> list[_Segment]:
    """Split the (topologically sorted) nodes after a wanted tensor's producer once a segment holds
    SEGMENT_BYTES of weights; each node of `streamed` (ids) is a segment of its own."""
    groups, cur, nbytes, seen = [], [], 0, set()
    for node in nodes:
        if id(node) in streamed:
            if cur:
                groups.append(cur)
            groups.append([node])
            cur, nbytes, seen = [], 0, set()
            continue
        cur.append(node)
        for name in [*node.input, *_outer_names(node)]:
            if name in inits and name not in seen:
                seen.add(name)
                nbytes += stream.numel(inits[name]) * stream.np_dtype(inits[name].data_type).itemsize
        if nbytes >= segment_bytes and any(o in wanted for o in node.output):
            groups.append(cur)
            cur, nbytes, seen = [], 0, set()
    if cur:
        groups.append(cur)
    reads = [{i for n in g for i in (*n.input, *_outer_names(n)) if i and i not in inits} for g in groups]
    segments = []
    for j, group in enumerate(groups):
        made = [o for n in group for o in n.output if o]
        later = set().union(*reads[j + 1:]) if j + 1 < len(groups) else set()
        produced = set(made)
        outputs = [o for o in made if o in wanted or o in later]
        inputs = sorted(reads[j] - produced)
        segments.append(_Segment(group, inputs, outputs, wanted & produced, later,
                                 streamed=len(group) == 1 and id(group[0]) in streamed))
    return segments


def _submodel(model: onnx.ModelProto, seg: _Segment, values: dict) -> onnx.ModelProto:
    """The model holding one segment's nodes: its inputs typed from the first prompt's values."""
    from onnx import helper

    sub = onnx.ModelProto()
    sub.CopyFrom(model)
    g = sub.graph
    used = {i for n in seg.nodes for i in (*n.input, *_outer_names(n))}
    declared = {i.name: i for i in model.graph.input}
    del g.node[:]
    g.node.extend(seg.nodes)
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    del g.input[:]
    g.input.extend(declared[n] if n in declared else helper.make_tensor_value_info(
        n, helper.np_dtype_to_tensor_dtype(values[n].dtype), [None] * values[n].ndim) for n in seg.inputs)
    del g.output[:]
    g.output.extend(onnx.ValueInfoProto(name=n) for n in seg.outputs)
    names = used | {o for n in seg.nodes for o in n.output}
    infos = [v for v in g.value_info if v.name in names]
    del g.value_info[:]
    g.value_info.extend(infos)
    return sub


def _feeds(inputs, ids: list[int]) -> dict[str, np.ndarray]:
    n = len(ids)
    feeds = {}
    for i in inputs:
        if i.name == "input_ids":
            feeds[i.name] = np.asarray([ids], np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, n), np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(n, dtype=np.int64)[None]
        elif "past" in i.name:  # a KV-cache export: an empty past [1, H, 0, D]
            dims = [d.dim_value if d.HasField("dim_value") else (1 if k == 0 else 0)
                    for k, d in enumerate(i.type.tensor_type.shape.dim)]
            feeds[i.name] = np.zeros(dims, np.float16 if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
                                     else np.float32)
        else:
            raise RewriteError(f"calibration: cannot feed the baseline's input '{i.name}'")
    return feeds


def _keep_only(graph: onnx.GraphProto, names: list[str]) -> None:
    """Make `names` the graph's only outputs and drop every node, initializer and input they do not need."""
    producer = {o: n for n in graph.node for o in n.output}
    needed, todo, seen = set(), list(names), set()
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        node = producer.get(t)
        if node is None or id(node) in needed:
            continue
        needed.add(id(node))
        todo.extend(i for i in node.input if i)
        todo.extend(_outer_names(node))
    kept = [n for n in graph.node if id(n) in needed]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.output[:]
    graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    used = {i for n in graph.node for i in (*n.input, *_outer_names(n))}
    inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    inputs = [i for i in graph.input if i.name in used]
    del graph.input[:]
    graph.input.extend(inputs)


def _outer_names(node) -> list[str]:
    """Names a node's subgraphs (If / Loop / Scan bodies) read from the enclosing graph (a superset)."""
    out = []
    for attr in node.attribute:
        for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            for n in g.node:
                out.extend(i for i in n.input if i)
                out.extend(_outer_names(n))
    return out


def calibrate_kv(run, path: str | None) -> list[tuple[float, float]]:
    """(k_scale, v_scale) per layer: amax / 448 of the roped K and of V over the calibration prompts, as the
    runtime's exporter computes them (per tensor, per layer)."""
    rows = token_rows(run, prompts(path))
    names = [t.name for layer in run.layers for t in (layer.k, layer.v)]
    which = {t.name: (i, j) for i, layer in enumerate(run.layers) for j, t in enumerate((layer.k, layer.v))}
    amax = np.zeros((len(run.layers), 2))
    for p, out in Baseline(run.in_path, names).run(rows):
        for name, x in out.items():
            i, j = which[name]
            x = np.asarray(x, np.float32)
            if j == 0:  # K: [B, S, Hkv, D], roped as the runtime stores it (dims past rotary_dim pass through)
                x = apply_rope(x.transpose(0, 2, 1, 3), layer_rope_table(run.layers[i], len(rows[p])))
            amax[i, j] = max(amax[i, j], np.abs(x).max())
    scales = np.where(amax > 0, amax / fp8.E4M3_MAX, 1.0).astype(np.float32)
    return [(float(k), float(v)) for k, v in scales]


ROWS = 128  # activation rows kept per linear for the INT4 scale search (cost: 9 trial GEMMs of ROWS x K x N)


def linear_inputs(run, path: str | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per MatMul weight name: (mean |x| per input channel [K], up to ROWS rows of x [m, K]) over the
    calibration prompts, x the MatMul's input in the baseline. A linear whose input the baseline does not
    hold under the same name (normalization made it) is left out."""
    import onnx_graphsurgeon as gs

    linears = {}
    for node in run.source.graph.nodes:
        if node.op == "MatMul" and isinstance(node.inputs[1], gs.Constant) and len(node.inputs[1].shape) == 2 \
                and not isinstance(node.inputs[0], gs.Constant):
            linears.setdefault(node.inputs[0].name, []).append(node.inputs[1].name)
    rows = token_rows(run, prompts(path))
    sums: dict = {}
    kept: dict = {}
    count = sum(len(ids) for ids in rows)
    # the rows kept: evenly spaced over all prompts' tokens; each prompt keeps only its own (not every row)
    pick = np.linspace(0, count - 1, min(ROWS, count)).astype(int)
    starts = np.cumsum([0, *map(len, rows)])
    for p, out in Baseline(run.in_path, list(linears), skip_missing=True).run(rows):
        mine = pick[(pick >= starts[p]) & (pick < starts[p + 1])] - starts[p]
        for name, x in out.items():
            x = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
            sums[name] = sums.get(name, 0) + np.abs(x).sum(axis=0)
            kept.setdefault(name, []).append(x[mine])
    out = {}
    for name, total in sums.items():
        x = np.concatenate(kept[name])
        for w in linears[name]:
            out[w] = (total / count, x)
    return out
