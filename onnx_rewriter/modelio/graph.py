"""Load a graph without its weights; write weights through, one tensor at a time.

onnx-graphsurgeon materializes every tensor it is given (9.4 GB for a 2 GB model). So the proto is read
with `load_external_data=False`: large tensors stay on disk as external-data references inside gs's
LazyValues, small ones (shape constants, inv_freq, scales) are loaded inline so patterns can read them.
On save, each large tensor is read through a memory map, converted and written to the output.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from .. import progress
from ..errors import RewriteError
from . import stream

log = logging.getLogger(__name__)

# Tensors up to this many elements are loaded into memory; larger ones stay lazy.
SMALL_TENSOR_ELEMENTS = 1 << 16
# Alignment of tensors inside the output's external-data file (lets readers mmap them).
ALIGN = 64

# The float types the output's one float type replaces (modelio/dtype.py) and the writer converts.
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


@dataclass
class SourceModel:
    """The graph (structure and small constants) plus where its large tensors live."""

    graph: gs.Graph
    path: Path
    opset: int
    ir_version: int
    metadata: dict = field(default_factory=dict)
    module_paths: dict = field(default_factory=dict)  # linear node name -> HF module path (linear_names.py)

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def _check_external(t: TensorProto, base_dir: Path) -> None:
    try:
        info = external_data_helper.ExternalDataInfo(t)
    except ValueError as exc:  # a negative offset or length, a non-integer one
        raise RewriteError(f"tensor '{t.name}' has a broken external data entry in the .onnx file in {base_dir} "
                           f"({exc}); re-export the model") from None
    if (info.offset or 0) < 0 or (info.length or 0) < 0:
        raise RewriteError(f"tensor '{t.name}' has a negative external data offset or length ({info.offset}, "
                           f"{info.length}) in the .onnx file in {base_dir}; re-export the model")
    file = base_dir / info.location
    if Path(info.location).is_absolute() or ".." in Path(info.location).parts:
        raise RewriteError(f"external data location '{info.location}' of tensor '{t.name}' is outside the model's "
                           f"folder; ONNX external data must lie beside the .onnx file")
    if file.exists() and not file.is_file():  # a FIFO or a device (/dev/zero) would hang or read forever
        raise RewriteError(f"external data file '{file}' of tensor '{t.name}' is not a regular file (a FIFO, device "
                           f"or folder); put the model's real data file there")
    if not file.is_file():
        raise RewriteError(
            f"external data file '{info.location}' of tensor '{t.name}' is missing next to the model "
            f"(looked in {base_dir}); copy it beside the .onnx file"
        )
    end = (info.offset or 0) + (info.length or 0)
    if file.stat().st_size < end:
        raise RewriteError(
            f"external data file '{info.location}' is truncated ({file.stat().st_size} bytes, tensor "
            f"'{t.name}' needs {end}); re-export the model"
        )


def load(path: str | os.PathLike) -> SourceModel:
    path = Path(path)
    if not path.exists():
        raise RewriteError(f"input '{path}' does not exist; give the path of a .onnx file")
    if not path.is_file():
        raise RewriteError(f"input '{path}' is not a file; give the path of a .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends carry no useful text
        raise RewriteError(f"'{path}' is not a readable ONNX file ({type(exc).__name__}); re-export it") from None
    if not model.graph.node:
        raise RewriteError(f"'{path}' is not an ONNX model (no graph nodes); give a baseline export")
    check_plain_export(model, path)
    base_dir = path.parent
    for t in _all_initializers(model.graph):
        if t.data_location == TensorProto.EXTERNAL:
            _check_external(t, base_dir)
            if stream.numel(t) <= SMALL_TENSOR_ELEMENTS:
                # Our own bounded read rather than onnx's: it refuses linked files, which is how an export
                # references the checkpoint's weights (checkpoint_refs.py).
                t.raw_data = np.ascontiguousarray(read_tensor(t, base_dir)).tobytes()
                # cleared, not set to DEFAULT: the tensor is then written as it would be had the baseline held
                # it inline (an export that references the checkpoint writes what one that copies it does)
                t.ClearField("data_location")
                del t.external_data[:]
    model = _infer_shapes(model, path)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    meta = {p.key: p.value for p in model.metadata_props}
    paths = module_paths(model)  # node metadata: onnx-graphsurgeon drops it
    # gs warns about every bf16 tensor (no numpy type; it keeps the proto type, which is what we want)
    # and about its missing `colored` module: noise to a user of a bf16 export.
    graph = quiet_import(model)
    return SourceModel(graph=graph, path=path, opset=opset, ir_version=model.ir_version, metadata=meta,
                       module_paths=paths)


# Opsets whose ops the patterns and probes are written for (Softmax/Unsqueeze/ReduceMean semantics of 13+,
# Trilu 14) up to the newest onnx knows.
MIN_OPSET = 14


def check_plain_export(model: onnx.ModelProto, path) -> None:
    """A baseline export we can read: no EdgeLLM graph (already rewritten), an opset in range."""
    if any(n.op_type == "AttentionPlugin" for n in model.graph.node) or any(
            i.name == "inputs_embeds" for i in model.graph.input) and not any(
            i.name == "input_ids" for i in model.graph.input):
        raise RewriteError(f"'{path}' is already an EdgeLLM graph (rewritten by onnx_rewriter: AttentionPlugin "
                           f"nodes, inputs_embeds); give the plain export it was rewritten from")
    _check_linears(model, path)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and not MIN_OPSET <= opset <= newest:
        raise RewriteError(f"'{path}' uses ONNX opset {opset}; onnx_rewriter reads opsets {MIN_OPSET} to {newest}: "
                           f"re-export the model with an opset in that range (torch.onnx.export's default is fine)")


def _check_linears(model: onnx.ModelProto, path) -> None:
    """A weight matrix multiplied from the left (MatMul(W, x)) contracts x's token axis, not its features:
    no decoder layer does that, and a rewrite around it would keep a graph that cannot run."""
    weights = {t.name: t.dims for t in model.graph.initializer if len(t.dims) == 2 and min(t.dims) > 1}
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[0] in weights and n.input[1] not in weights:
            raise RewriteError(f"'{path}': MatMul node '{n.name}' multiplies the weight '{n.input[0]}' "
                               f"{list(weights[n.input[0]])} from the left, which mixes tokens; not a decoder "
                               f"LLM export this tool understands")


def _infer_shapes(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """Shapes and types of intermediates (static dims let normalize fold run-time slice bounds).

    A graph that fails strict inference (wrong input ranks, mismatched dims, an operand of the wrong type,
    a constant shape that contradicts the dims it is applied to) is refused here: no runtime would run it,
    and a fusion could hide the defect by replacing the broken subgraph. Every baseline the tests export
    (13 families; dynamo, TorchScript, opset 23, eager, bf16, KV-cache exports) passes the strictest
    setting; the fuzzer's retyped Casts and perturbed Concat constants do not.
    """
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as exc:
        lines = [l.strip() for l in str(exc).replace("Inference error(s):", "\n").splitlines() if l.strip()]
        first = next((l for l in lines if l.startswith("(op_type")), lines[0] if lines else "")
        raise RewriteError(f"'{path}' is not a valid ONNX graph (shape inference: {first[:200]}); "
                           f"re-export the model") from None
    except Exception as exc:  # odd graphs: match without the extra shape info
        log.debug("shape inference failed: %s", exc)
        return model


def _all_initializers(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


# ---------------------------------------------------------------- reading tensors


def read_tensor(t: TensorProto, base_dir: Path) -> np.ndarray:
    """A tensor's values; external data comes through a read-only memory map (no copy)."""
    if stream.concat_sources(t) is not None:
        return stream.array(t, base_dir)
    if t.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    return stream.mapped(t, base_dir)  # bf16 as raw uint16 bits: values_of / convert_float widen them


def values_of(t: TensorProto, base_dir: Path) -> np.ndarray:
    """Values as a numpy array of a real dtype (bf16 widened to float32)."""
    arr = read_tensor(t, base_dir)
    if t.data_type == TensorProto.BFLOAT16:
        if arr.dtype == np.uint16:
            return stream.bf16_bits_to_fp32(arr)
        return np.asarray(arr, dtype=np.float32)
    return arr


# graphsurgeon keeps a constant's values either as an array or as a LazyValues around a TensorProto (on disk,
# declared or computed: see stream.py). Its private `_values` and `LazyValues` are touched here only.
def lazy_proto(c: gs.Constant) -> TensorProto | None:
    """The TensorProto a constant's values still live in, or None when they are an array in memory."""
    vals = c._values
    return vals.tensor if isinstance(vals, gs.ir.tensor.LazyValues) else None


def is_lazy(c: gs.Constant) -> bool:
    return lazy_proto(c) is not None


def lazy_constant(name: str, proto: TensorProto) -> gs.Constant:
    """A constant whose values stay in `proto` until they are read or written."""
    with quiet_gs():
        return gs.Constant(name, gs.ir.tensor.LazyValues(proto))


def to_lazy_constant(t: gs.Variable, proto: TensorProto) -> None:
    """Turn the variable `t` into a constant in place (its readers keep it) whose values stay in `proto`."""
    t.to_constant(gs.ir.tensor.LazyValues(proto))


def computed_constant(name: str, dtype, shape, produce) -> gs.Constant:
    """A constant whose values `produce()` returns when the writer reaches it (called once): the graph holds
    only name, type and dims, so a quantized model never sits in memory at once (stream.computed)."""
    proto = stream.computed(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape, produce)
    return lazy_constant(name, proto)


def _materialize(t: TensorProto) -> None:
    """Fill a small computed tensor's raw_data (the writer then handles it like any inline tensor)."""
    arr = stream.produce(t)
    t.doc_string = ""
    t.raw_data = arr.tobytes()


def constant_array(c: gs.Constant, base_dir: Path) -> np.ndarray:
    proto = lazy_proto(c)
    return values_of(proto, base_dir) if proto is not None else np.asarray(c.values)


def constant_row_blocks(c: gs.Constant, base_dir: Path, rows: int, dtype=np.float16):
    """Yield (row, block) of a constant along its first axis, `rows` rows at a time, converted to `dtype`: read
    in chunks (stream.chunks), never the whole tensor at once. Each block is a fresh array (a 3-D constant's
    blocks are [rows, d1, d2]: MoE experts one or a few at a time)."""
    proto = lazy_proto(c)
    if proto is None:
        arr = np.asarray(c.values)
        for start in range(0, arr.shape[0], rows):
            yield start, arr[start:start + rows].astype(dtype)
        return
    inner = tuple(int(d) for d in proto.dims[1:])
    width = int(np.prod(inner))
    start = 0
    for chunk in stream.chunks(proto, base_dir, chunk_bytes=rows * width * stream.np_dtype(proto.data_type).itemsize):
        block = convert_float(chunk, proto.data_type, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
        yield start, np.array(block, dtype=dtype).reshape(-1, *inner)
        start += chunk.size // width


# ---------------------------------------------------------------- writing


def convert_float(arr: np.ndarray, proto_type: int, want: int) -> np.ndarray:
    if proto_type == want:
        return arr
    if proto_type == TensorProto.BFLOAT16 and arr.dtype == np.uint16:
        arr = stream.bf16_bits_to_fp32(arr)
    return arr.astype(helper.tensor_dtype_to_np_dtype(want))


class WeightWriter:
    """Streams initializers into `<model>.data` (external) or inline raw_data, converting float dtypes."""

    def __init__(self, out_model: Path, source_dir: Path, float_type: int, external: bool, narrow: set[str],
                 external_min: int = SMALL_TENSOR_ELEMENTS):
        self.external_min = external_min  # tensors above this many elements go to the data file
        self.source_dir = source_dir
        self.narrow = narrow
        self.float_type = float_type
        self.external = external
        self.data_name = out_model.name + ".data"
        self._fh = stream.AsyncWriter(open(out_model.parent / self.data_name, "wb")) if external else None
        self._offset = 0
        self.progress = None  # callable(nbytes read), for a progress bar

    def close(self) -> None:
        if self._fh:
            self._fh.close()

    def _target_type(self, t: TensorProto) -> int:
        # Only the weights the dtype pass deferred: other float tensors already have their final type
        # (some deliberately fp32, e.g. RMSNorm constants).
        return self.float_type if t.name in self.narrow and t.data_type in FLOAT_TYPES else t.data_type

    def rewrite(self, t: TensorProto) -> None:
        """Replace `t`'s storage in place with converted data (inline or external)."""
        large = stream.numel(t) > self.external_min
        # A large computed one is streamed to the file below (write_tensor), not put in raw_data: those bytes
        # stay in the proto's upb arena after Clear(), so each quantized weight would add to the peak.
        if stream.is_computed(t) and not (self.external and large):
            _materialize(t)
        want = self._target_type(t)
        needs_convert = want != t.data_type
        if not needs_convert and not (self.external and large) and t.data_location != TensorProto.EXTERNAL \
                and not stream.derived(t):
            return
        # Chunked read-convert-write (stream.py): the peak stays at a few MB per external tensor.
        # The data is read from `t` before `t` is cleared and pointed at its new home.
        raw, offset = None, None
        if self.external and large:
            self._fh.write(b"\0" * ((-self._offset) % ALIGN))
            self._offset += (-self._offset) % ALIGN
            offset = self._offset
            self._offset += stream.write_tensor(t, self.source_dir, want, self._fh, progress=self.progress)
        else:
            raw = stream.tensor_bytes(t, self.source_dir, want, progress=self.progress)
        name, dims = t.name, list(t.dims)
        t.Clear()
        t.name, t.data_type = name, want
        t.dims.extend(dims)
        if raw is None:
            # set_external_data() insists on raw_data being present; the bytes already went to the file.
            for k, v in (("location", self.data_name), ("offset", str(offset)), ("length", str(self._offset - offset))):
                e = t.external_data.add()
                e.key, e.value = k, v
            t.data_location = TensorProto.EXTERNAL
        else:
            t.raw_data = raw


# --external-data asked for explicitly: every weight but the smallest (norms, biases) goes to the data file,
# also in a small model (where none passes SMALL_TENSOR_ELEMENTS and the data file was empty).
EXPLICIT_EXTERNAL_MIN = 1024


def save(model: onnx.ModelProto, out_path: Path, source_dir: Path, float_type: int, external: bool,
         narrow: set[str] = frozenset(), external_min: int = SMALL_TENSOR_ELEMENTS) -> list[str]:
    """Write `model`, converting the weights named in `narrow` to `float_type`; returns the files written.
    `external_min`: with `external`, tensors above this many elements go to `<model>.data`."""
    writer = WeightWriter(out_path, source_dir, float_type, external, set(narrow), external_min)
    tensors = list(_all_initializers(model.graph))
    total = sum(stream.nbytes(t) for t in tensors if stream.numel(t) > SMALL_TENSOR_ELEMENTS)
    # Inline output: external-data, derived and computed weights are streamed into model.onnx at the end
    # (stream.save_inline) rather than held in the proto: the proto and its serialized copy would be twice the
    # weights, and every computed (e.g. INT4-packed) weight would be in memory at once.
    inits = model.graph.initializer
    later = {t.name for t in inits if not external and (t.data_location == TensorProto.EXTERNAL or stream.derived(t))}
    streamed = []
    try:
        with progress.bar(total=total, desc="weights", nbytes=True) as pb:
            writer.progress = pb.update
            for t in tensors:
                if t.name not in later:
                    writer.rewrite(t)
            for i in reversed(range(len(inits))):  # by index: deleting from a repeated field while iterating
                if inits[i].name in later:
                    src = TensorProto()
                    src.CopyFrom(inits[i])  # external: a reference, not bytes
                    streamed.insert(0, (src, writer._target_type(src)))
                    del inits[i]
            if streamed:
                where = stream.save_inline(model, out_path, streamed, source_dir, progress=pb.update)
                _SKELETONS[str(out_path)] = _skeleton(model, streamed, where, out_path.name)
    finally:
        writer.close()
    if not streamed:
        onnx.save_model(model, str(out_path))
    files = [out_path.name]
    if external and writer._offset == 0:  # every weight small enough to stay inline: no empty data file
        (out_path.parent / writer.data_name).unlink(missing_ok=True)
    elif external:
        files.append(writer.data_name)
    return files


_SKELETONS: dict[str, onnx.ModelProto] = {}


def _skeleton(model: onnx.ModelProto, streamed: list, where: list, file_name: str) -> onnx.ModelProto:
    """The written model with each streamed weight as an external-data reference to its own bytes inside
    the .onnx file: what check() hands to onnx.checker instead of parsing every weight."""
    sk = onnx.ModelProto()
    sk.CopyFrom(model)
    for (src, want), (name, offset, length) in zip(streamed, where):
        t = sk.graph.initializer.add(name=name, data_type=want, dims=src.dims, data_location=TensorProto.EXTERNAL)
        for k, v in (("location", file_name), ("offset", str(offset)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = k, v
    return sk


def check(path: Path) -> None:
    """onnx.checker (full check) on a model save() wrote. An inline model whose weights were streamed is
    checked through its skeleton: parsing the whole file would hold every weight in memory again (plus a
    copy for shape inference: 2 GB for a 0.5B model). tests/test_scale.py reads such files back in full."""
    sk = _SKELETONS.pop(str(path), None)
    if sk is None:
        onnx.checker.check_model(str(path), full_check=True)
        return
    tmp = Path(path).with_name(f".{Path(path).name}.skeleton.onnx")
    try:
        onnx.save_model(sk, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
    finally:
        tmp.unlink(missing_ok=True)


def weights_nbytes(graph: gs.Graph, float_itemsize: int) -> int:
    """Output size of the graph's float weights, to decide on external data (2 GB protobuf limit)."""
    total = 0
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant):
            proto = lazy_proto(t)
            dims = list(proto.dims) if proto is not None else list(t.shape)
            n = int(np.prod(dims)) if dims else 1
            dtype = proto.data_type if proto is not None else helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))
            total += n * (float_itemsize if dtype in FLOAT_TYPES else helper.tensor_dtype_to_np_dtype(dtype).itemsize)
    return total


# module_paths: scopes above the *ForCausalLM module (our export's wrapper) are cut off (linear_names.py)
_CAUSAL_LM = re.compile(r"(ForCausalLM|LMHeadModel)$")


def module_paths(model) -> dict[str, str]:
    """node name -> HF module path (e.g. `model.layers.0.self_attn.q_proj`) from dynamo's node metadata."""
    out = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or not node.metadata_props:
            continue
        meta = {p.key: p.value for p in node.metadata_props}
        try:
            scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "None"))
            classes = ast.literal_eval(meta.get("pkg.torch.onnx.class_hierarchy", "[]"))
        except (ValueError, SyntaxError):
            continue
        if not isinstance(scopes, list) or len(scopes) < 2:
            continue
        path = scopes[-2]  # the innermost module; the last scope is the traced op ("linear")
        # Cut the scopes of wrappers around the *ForCausalLM module: its children are the adapter's names.
        for scope, cls in zip(scopes[:-1], classes if isinstance(classes, list) else []):
            if _CAUSAL_LM.search(str(cls)) and scope and path.startswith(scope + "."):
                path = path[len(scope) + 1:]
                break
        if path:
            out[node.name] = path
    return out


# The two graph readers normalize and the patterns share (matching re-exports them for the patterns).
def producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if t is not None and len(t.inputs) == 1 else None


def const(t: gs.Tensor) -> np.ndarray | None:
    """Values of a small constant tensor, or None (large weights stay lazy and are never read here)."""
    if isinstance(t, gs.Constant):
        lazy = lazy_proto(t)
        if lazy is not None and (lazy.data_location == 1 or stream.is_computed(lazy)):
            return None  # on disk, or computed only when written (graph.computed_constant)
        return np.asarray(t.values)
    return None


def quiet_import(model) -> gs.Graph:
    """gs.import_onnx without gs's warnings (quiet_gs)."""
    with quiet_gs():
        return gs.import_onnx(model)


@contextlib.contextmanager
def quiet_gs():
    """gs without its warnings about types it has no numpy type for (bf16, FLOAT8E4M3FN: it keeps the proto type,
    which is what we want) and about its missing `colored` module."""
    from onnx_graphsurgeon.logger import G_LOGGER

    severity, G_LOGGER.severity = G_LOGGER.severity, G_LOGGER.ERROR
    try:
        yield
    finally:
        G_LOGGER.severity = severity
