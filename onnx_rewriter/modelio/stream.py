"""Stream a tensor from its source into an output file, chunk by chunk, converting its float type.

Why chunks: a whole weight read through a memory map counts fully in the resident set (the 545 MB
fp32 embedding of a 0.5B model alone), and `astype` + `tobytes` add two more copies. Chunks of
CHUNK_BYTES, each mapped on its own and converted straight into the writer's buffer, keep the peak at a
few chunk buffers whatever the model size.

Why onnxruntime: numpy's float32 -> float16 `astype` runs at ~0.35 GB/s here, onnxruntime's Cast
kernel (SIMD) at ~3.5 GB/s, bit for bit the same result (round to nearest even, overflow to inf). Its
bf16 Cast is scalar, though, and its Transpose twice numpy's strided copy: bf16 is widened in numpy (a
shift) before the fp32 Cast, and weights read transposed go through its Transpose.
"""

from __future__ import annotations

import json
import mmap
import queue
import threading
from pathlib import Path

import numpy as np
from onnx import TensorProto, external_data_helper, helper, numpy_helper

# 4 MB: a chunk's output, handed to the writer thread, is still in the CPU's cache (32 MB L3 here) when
# write() copies it into the page cache. With 16 MB chunks and four buffers in flight it was not, and the
# copy ran at 1.8 GB/s: the 0.5B rewrite took 0.5 s longer and 1 s more CPU (A/B, 8 runs each).
CHUNK_BYTES = 4 << 20

_NP = {TensorProto.BFLOAT16: np.dtype(np.uint16),  # bf16 travels as raw bits
       TensorProto.FLOAT4E2M1: np.dtype(np.uint8)}  # FLOAT4E2M1 as packed bytes (PACKED4)


def np_dtype(proto_type: int) -> np.dtype:
    return _NP.get(proto_type) or np.dtype(helper.tensor_dtype_to_np_dtype(proto_type))


def numel(t: TensorProto) -> int:
    return int(np.prod(t.dims)) if len(t.dims) else 1


# 4-bit types travel as onnx stores them: two codes a byte (element 2i in the low nibble), as uint8 bytes.
# Only FLOAT4E2M1 (NVFP4 weights, computed by features/wa_quant.py) goes through here; INT4 inputs are decoded
# by features/int4/onnx_in.py before anything streams them.
PACKED4 = {TensorProto.FLOAT4E2M1}


def stored(t: TensorProto) -> int:
    """Items of `t`'s stored data: its elements, or its bytes for a 4-bit (packed) type."""
    return (numel(t) + 1) // 2 if t.data_type in PACKED4 else numel(t)


def nbytes(t: TensorProto, want: int | None = None) -> int:
    """Bytes of `t`'s data stored as `want` (its own type by default)."""
    want = t.data_type if want is None else want
    n = numel(t)
    return (n + 1) // 2 if want in PACKED4 else n * np_dtype(want).itemsize


def bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    """bf16 values held as raw uint16 bits -> float32 (exact: bf16 is fp32's upper half)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


# doc_string of a weight whose external data holds it untransposed (normalize.fold_weight_transposes):
# it is read transposed. Only inside a rewrite; what is written has plain data and no marker.
TRANSPOSED = "onnx_rewriter:transposed "


def transposed(t: TensorProto) -> tuple[int, ...] | None:
    """The perm `t` is read through, or None for a plain tensor."""
    if not t.doc_string.startswith(TRANSPOSED):
        return None
    return tuple(int(p) for p in t.doc_string[len(TRANSPOSED):].split(","))


# doc_string of a weight that is its sources concatenated on the last axis (projections.fuse_qkv): it is
# read through them, so a fused weight is streamed like any other. Only inside a rewrite, like TRANSPOSED.
CONCAT = "onnx_rewriter:concat "
_CONCATS: dict[str, list[TensorProto]] = {}


def concatenated(name: str, sources: list[TensorProto]) -> TensorProto:
    """A tensor declared as `sources` (same type, same leading dims) concatenated on their last axis."""
    dims = list(sources[0].dims[:-1]) + [sum(s.dims[-1] for s in sources)]
    key = f"{len(_CONCATS)}:{name}"
    _CONCATS[key] = sources
    return TensorProto(name=name, data_type=sources[0].data_type, dims=dims, doc_string=CONCAT + key)


def concat_sources(t: TensorProto) -> list[TensorProto] | None:
    return _CONCATS.get(t.doc_string[len(CONCAT):]) if t.doc_string.startswith(CONCAT) else None


# doc_string of a tensor whose values a function returns when the writer reaches it (graph.computed_constant,
# e.g. one INT4-packed weight): streamed like a read one, so no quantized model sits in memory at once.
COMPUTED = "onnx_rewriter:computed "
_PRODUCERS: dict[str, object] = {}


def computed(name: str, data_type: int, dims, produce) -> TensorProto:
    """A tensor declared with its name, type and dims whose values `produce()` returns (called once)."""
    key = f"{len(_PRODUCERS)}:{id(produce)}:{name}"
    _PRODUCERS[key] = produce
    return TensorProto(name=name, data_type=data_type, dims=list(dims), doc_string=COMPUTED + key)


def is_computed(t: TensorProto) -> bool:
    return t.doc_string.startswith(COMPUTED)


def produce(t: TensorProto) -> np.ndarray:
    """A computed tensor's values (its producer runs now, once), checked against its declaration."""
    blocks = list(produce_blocks(t))
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


def produce_blocks(t: TensorProto):
    """A computed tensor's values as its producer gives them: one array, or blocks of leading-axis rows in order
    (an iterator: a quantized weight made a few MB at a time), each checked against the declaration."""
    got = _PRODUCERS.pop(t.doc_string[len(COMPUTED):])()
    packed = t.data_type == TensorProto.FLOAT4E2M1  # produced packed: uint8 [..., K/2]
    dims = (*t.dims[:-1], (t.dims[-1] + 1) // 2) if packed else tuple(t.dims)
    rows = 0
    for arr in [got] if isinstance(got, np.ndarray) else got:
        arr = np.ascontiguousarray(arr)
        typed = arr.dtype == np.uint8 if packed else helper.np_dtype_to_tensor_dtype(arr.dtype) == t.data_type
        if not typed or tuple(arr.shape[1:]) != tuple(dims[1:]):
            raise RuntimeError(f"computed tensor '{t.name}' came out {arr.dtype}{arr.shape}, declared "
                               f"{tuple(t.dims)}" + (" (packed: uint8 with half the last axis)" if packed else ""))
        rows += arr.shape[0] if arr.ndim else 1
        yield arr
    if rows != (dims[0] if dims else 1):
        raise RuntimeError(f"computed tensor '{t.name}' came out with {rows} rows, declared {tuple(t.dims)}")


def derived(t: TensorProto) -> bool:
    """Read through a marker (transposed, concatenated or computed): what is written carries no doc_string."""
    return transposed(t) is not None or t.doc_string.startswith(CONCAT) or is_computed(t)


def array(t: TensorProto, base_dir: Path) -> np.ndarray:
    """`t`'s values in its own dtype (bf16 as uint16 bits) and shape, without a copy where it is on disk."""
    sources = concat_sources(t)
    if sources is not None:
        return np.concatenate([array(s, base_dir) for s in sources], axis=-1)
    if t.data_location == TensorProto.EXTERNAL:
        return mapped(t, base_dir)
    if t.HasField("raw_data"):
        return np.frombuffer(t.raw_data, dtype=np_dtype(t.data_type)).reshape(tuple(t.dims))
    arr = numpy_helper.to_array(t)
    if t.data_type == TensorProto.BFLOAT16:
        arr = arr.view(np.uint16) if arr.dtype.itemsize == 2 else arr.astype(np.uint16)
    return arr


def mapped(t: TensorProto, base_dir: Path) -> np.ndarray:
    """An external tensor as a read-only memory map of its values (bf16 as uint16 bits), in `t`'s shape."""
    info = external_data_helper.ExternalDataInfo(t)
    perm = transposed(t)
    dims = tuple(t.dims)
    if perm is not None:  # the source's own shape: dims under the inverse permutation
        dims = tuple(dims[i] for i in np.argsort(perm))
    try:  # a file shorter than the tensor (truncated since the load's checks): an error, never a map past its end
        mm = np.memmap(Path(base_dir) / info.location, dtype=np_dtype(t.data_type), mode="r", offset=info.offset or 0,
                       shape=dims or (1,))
    except ValueError:
        raise OSError(f"external data of '{t.name}' ends early in {info.location}") from None
    if not dims:
        return mm.reshape(())
    return mm if perm is None else mm.transpose(perm)


def _ort_session(node, src: int, dst: int, rank: int):
    """A one-node onnxruntime session x -> y, or None where onnxruntime lacks the kernel."""
    try:
        import onnxruntime as ort

        graph = helper.make_graph([node], node.op_type.lower(),
                                  [helper.make_tensor_value_info("x", src, [None] * rank)],
                                  [helper.make_tensor_value_info("y", dst, [None] * rank)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # One thread: ~5.6 GB/s, faster than the default pool, and the disk is slower anyway.
        opts.intra_op_num_threads = 1
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception:  # no onnxruntime kernel for this pair: numpy does it
        return None


def _ort_run(sess, src: np.ndarray, src_type: int, dst: np.ndarray) -> None:
    """Run a one-node session from contiguous `src` into `dst` (bound in place: no output copy)."""
    import onnxruntime as ort

    binding = sess.io_binding()
    binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy_with_onnx_type(src, src_type))
    binding.bind_output("y", "cpu", 0, dst.dtype, list(dst.shape), dst.ctypes.data)
    sess.run_with_iobinding(binding)


# Transposes move raw items: any type of this size is the same bytes.
_SAME_SIZE = {1: TensorProto.UINT8, 2: TensorProto.UINT16, 4: TensorProto.UINT32, 8: TensorProto.UINT64}


class Caster:
    """dst[:] = src converted between ONNX float types, with onnxruntime (numpy as the fallback)."""

    def __init__(self):
        self._sessions: dict[tuple, object] = {}

    def _session(self, src: int, dst: int):
        if (src, dst) not in self._sessions:
            self._sessions[(src, dst)] = _ort_session(helper.make_node("Cast", ["x"], ["y"], to=dst), src, dst, 1)
        return self._sessions[(src, dst)]

    def __call__(self, src: np.ndarray, src_type: int, dst: np.ndarray, dst_type: int) -> None:
        if src_type == TensorProto.BFLOAT16 and dst_type != TensorProto.BFLOAT16 and src.size:
            # bf16 is fp32's upper half: widen with a shift (exact), then the fast fp32 Cast.
            f32 = dst if dst_type == TensorProto.FLOAT else _scratch("widen", src.size, np.float32)
            np.left_shift(src.reshape(-1), 16, out=f32.reshape(-1).view(np.uint32), dtype=np.uint32)
            if dst_type == TensorProto.FLOAT:
                return
            src, src_type = f32, TensorProto.FLOAT
        sess = self._session(src_type, dst_type) if src.size else None
        if sess is None:
            dst[...] = _numpy_cast(src, src_type, dst_type)
            return
        try:
            _ort_run(sess, np.ascontiguousarray(src).reshape(-1), src_type, dst.reshape(-1))
        except Exception:  # e.g. a bf16 output, which numpy cannot name for the binding: numpy from now on
            self._sessions[(src_type, dst_type)] = None
            dst[...] = _numpy_cast(src, src_type, dst_type)

    def transpose(self, src: np.ndarray, dst: np.ndarray) -> None:
        """dst[:] = src.T for a 2-D `src`, any item type (onnxruntime's blocked Transpose; numpy's copy
        where it has none)."""
        code = _SAME_SIZE.get(src.dtype.itemsize)
        key = ("Transpose", code)
        if key not in self._sessions:
            self._sessions[key] = code and _ort_session(helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0]),
                                                        code, code, 2)
        sess = self._sessions[key]
        if sess is not None and src.size:
            raw = np_dtype(code)
            try:
                _ort_run(sess, np.ascontiguousarray(src).view(raw), code, dst.view(raw))
                return
            except Exception:
                self._sessions[key] = None
        np.copyto(dst, src.T)


def _numpy_cast(src: np.ndarray, src_type: int, dst_type: int) -> np.ndarray:
    if src_type == TensorProto.BFLOAT16:
        src = bf16_bits_to_fp32(src)
    if dst_type == TensorProto.BFLOAT16:  # round to nearest even on the top 16 bits
        bits = np.asarray(src, np.float32).view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return src.astype(np_dtype(dst_type))


_CASTER = Caster()
_SCRATCH = threading.local()


def _scratch(role: str, n: int, dtype) -> np.ndarray:
    """A reused buffer of n `dtype` items. Fresh 16 MB arrays per chunk cost a page fault per 4 kB page,
    which made the page faults, not the reads or the conversion, half of the write time."""
    pool = _SCRATCH.__dict__.setdefault("bufs", {})
    nbytes = n * np.dtype(dtype).itemsize
    if role not in pool or pool[role].size < nbytes:
        pool[role] = np.empty(nbytes, np.uint8)
    return pool[role][:nbytes].view(dtype)


def chunks(t: TensorProto, base_dir: Path, chunk_bytes: int | None = None):
    """Yield `t`'s values as flat arrays of its own dtype (bf16 as uint16 bits), a few MB at a time.

    External data is read with readinto into one reused buffer: consume each chunk before the next.
    """
    dt = np_dtype(t.data_type)
    n = stored(t)
    step = max(1, (chunk_bytes or CHUNK_BYTES) // dt.itemsize)
    sources = concat_sources(t)
    if sources is not None:
        # Blocks of rows, each row the sources' rows side by side: one source block at a time in memory.
        parts = [array(s, base_dir).reshape(-1, s.dims[-1]) for s in sources]
        width, total = int(t.dims[-1]), parts[0].shape[0]
        rows = max(1, step // width)
        for start in range(0, total, rows):
            stop = min(total, start + rows)
            buf = _scratch("read", (stop - start) * width, dt).reshape(stop - start, width)
            col = 0
            for p in parts:
                buf[:, col:col + p.shape[1]] = p[start:stop]
                col += p.shape[1]
            yield buf.reshape(-1)
        return
    if (t.data_location == TensorProto.EXTERNAL and transposed(t) == (1, 0)
            and n * dt.itemsize > TRANSPOSE_MAPPED_BYTES):
        yield from _transposed_in_passes(t, base_dir, dt, step)
        return
    if t.data_location == TensorProto.EXTERNAL and transposed(t) is not None:
        # Blocks of output rows, gathered from the memory map into the reused buffer: each source page is
        # faulted in once; the map goes when the tensor is done.
        view, matrix = mapped(t, base_dir), transposed(t) == (1, 0)
        rows = max(1, step // max(1, n // max(1, t.dims[0])))  # output rows per chunk
        for start in range(0, t.dims[0], rows):
            block = view[start:start + rows]
            buf = _scratch("read", block.size, dt).reshape(block.shape)
            if matrix:  # a weight: its source columns [start, start + rows), transposed
                _CASTER.transpose(block.T, buf)
            else:
                np.copyto(buf, block)
            yield buf.reshape(-1)
        return
    if t.data_location == TensorProto.EXTERNAL:
        # Each chunk is a read-only map of its own bytes, dropped when the next is made: no copy into a
        # buffer (readinto was 0.15 s per 2 GB more), and only the chunk being read counts as resident.
        info = external_data_helper.ExternalDataInfo(t)
        with open(Path(base_dir) / info.location, "rb", buffering=0) as fh:
            for start in range(0, n, step):
                count = min(step, n - start)
                at = (info.offset or 0) + start * dt.itemsize
                skip = at % mmap.ALLOCATIONGRANULARITY
                try:
                    mm = mmap.mmap(fh.fileno(), skip + count * dt.itemsize, access=mmap.ACCESS_READ,
                                   offset=at - skip)
                except ValueError:  # past the end of the file
                    raise OSError(f"external data of '{t.name}' ends early in {info.location}") from None
                view = np.frombuffer(mm, dtype=dt, count=count, offset=skip)
                del mm  # the view holds the map; it is unmapped once the consumer lets go of the chunk
                yield view
                del view
        return
    if is_computed(t):
        for block in produce_blocks(t):
            flat = block.reshape(-1)
            for start in range(0, flat.size, step):
                yield flat[start:start + step]
        return
    if t.HasField("raw_data"):
        flat = np.frombuffer(t.raw_data, dtype=dt)
    else:
        flat = numpy_helper.to_array(t).reshape(-1)
        if t.data_type == TensorProto.BFLOAT16:
            flat = flat.view(np.uint16) if flat.dtype.itemsize == 2 else flat.astype(np.uint16)
    for start in range(0, n, step):
        yield flat[start:start + step]


# A weight written transposed is gathered from one memory map of its source up to this size (each page
# faulted once, all of them resident by the end); a larger one (an untied lm_head: 1 GB at 8B; an 8B's
# 117 MB MLP weights) in passes over its source (_transposed_in_passes), so the export's peak does not
# grow with the model.
TRANSPOSE_MAPPED_BYTES = 64 << 20
TRANSPOSE_BLOCK_BYTES = 128 << 20  # the output rows gathered per pass (an 8B MLP weight: one)


def _transposed_in_passes(t: TensorProto, base_dir: Path, dt: np.dtype, step: int):
    """A large [rows, cols] weight written as its [cols, rows] transpose, with little memory: each pass
    reads the whole source, a few MB of rows at a time (each mapped alone, unmapped when read), and gathers
    the next block of output rows (TRANSPOSE_BLOCK_BYTES) from it. output / block passes: 8 over the 1 GB
    lm_head of an 8B model instead of the whole source resident. (Read with readinto instead, the copies
    from the page cache cost the 8B export +15 s of system time; with 64 MB blocks, +25 s.)"""
    info = external_data_helper.ExternalDataInfo(t)
    out_rows, src_rows = int(t.dims[0]), int(t.dims[1])  # output [cols, rows] of the source [rows, cols]
    src_row_bytes = out_rows * dt.itemsize
    rows = max(1, min(out_rows, TRANSPOSE_BLOCK_BYTES // max(1, src_rows * dt.itemsize)))  # output rows per pass
    piece = max(1, CHUNK_BYTES // src_row_bytes)  # source rows per read
    block = _scratch("block", rows * src_rows, dt).reshape(rows, src_rows)  # reused: a fresh one faults per page
    with open(Path(base_dir) / info.location, "rb", buffering=0) as fh:
        for r0 in range(0, out_rows, rows):
            r1 = min(out_rows, r0 + rows)
            for p0 in range(0, src_rows, piece):
                p1 = min(src_rows, p0 + piece)
                at = (info.offset or 0) + p0 * src_row_bytes
                skip = at % mmap.ALLOCATIONGRANULARITY
                try:  # each piece mapped on its own, as chunks() reads plain weights: faults, no copy
                    mm = mmap.mmap(fh.fileno(), skip + (p1 - p0) * src_row_bytes, access=mmap.ACCESS_READ,
                                   offset=at - skip)
                except ValueError:  # past the end of the file
                    raise OSError(f"external data of '{t.name}' ends early in {info.location}") from None
                view = np.frombuffer(mm, dtype=dt, count=(p1 - p0) * out_rows, offset=skip).reshape(p1 - p0, -1)
                part = _scratch("pass", (p1 - p0) * (r1 - r0), dt).reshape(p1 - p0, r1 - r0)
                np.copyto(part, view[:, r0:r1])  # runs of r1 - r0 items: then onnxruntime's blocked Transpose
                del view
                mm.close()
                tile = _scratch("tile", part.size, dt).reshape(r1 - r0, p1 - p0)
                _CASTER.transpose(part, tile)
                block[: r1 - r0, p0:p1] = tile
            flat = block[: r1 - r0].reshape(-1)
            for start in range(0, flat.size, step):
                yield flat[start:start + step]


def converted(t: TensorProto, base_dir: Path, want: int, scale: float | None = None, progress=None, into=None):
    """Yield `t`'s values converted to `want`, chunk by chunk (views into reused buffers: consume each
    chunk before asking for the next). `into(n, dtype)`: the array a conversion writes (a reused buffer
    by default)."""
    into = into or (lambda n, dtype: _scratch("out", n, dtype))
    for chunk in chunks(t, base_dir):
        nbytes_in = chunk.size * chunk.dtype.itemsize
        src_type = t.data_type
        if scale is not None:  # an fp32 detour: multiply, then narrow
            f32 = _scratch("scale", chunk.size, np.float32)
            _CASTER(chunk, src_type, f32, TensorProto.FLOAT)
            f32 *= np.float32(scale)
            chunk, src_type = f32, TensorProto.FLOAT
        if src_type != want:
            out = into(chunk.size, np_dtype(want))
            _CASTER(chunk, src_type, out, want)
            chunk = out
            if want == TensorProto.FLOAT16:
                note_nonfinite(t.name, chunk)
        yield chunk
        if progress is not None:
            progress(nbytes_in)


# Weights found NaN, or out of fp16's range, once narrowed to fp16 ({name: "nan", "range" or "nan+range"}),
# for the rewrite's warning.
_NONFINITE: dict[str, str] = {}
_FP16_MAX, _FP16_INF = 0x7BFF, 0x7C00  # |x| bits: 65504 (where onnxruntime's Cast saturates), inf; above: NaN


def note_nonfinite(name: str, fp16: np.ndarray) -> None:
    """One AND and one max per chunk (~3 GB/s) on the narrowed bits; the details only when something is off."""
    bits = np.ascontiguousarray(fp16).reshape(-1).view(np.uint16)
    mag = _scratch("mag", bits.size, np.uint16)
    np.bitwise_and(bits, 0x7FFF, out=mag)
    if bits.size and mag.max() >= _FP16_MAX:
        kinds = set()
        if (mag > _FP16_INF).any():
            kinds.add("nan")
        if ((mag == _FP16_INF) | (mag == _FP16_MAX)).any():
            kinds.add("range")
        _NONFINITE[name] = "+".join(sorted(kinds | set(_NONFINITE.get(name, "").split("+")) - {""}))


def take_nonfinite() -> dict[str, str]:
    """The weights noted since the last call (and forget them)."""
    out = dict(_NONFINITE)
    _NONFINITE.clear()
    return out


def write_tensor(t: TensorProto, base_dir: Path, want: int, fh, scale: float | None = None, progress=None) -> int:
    """Write `t` converted to `want` into the open file `fh`; returns the number of bytes written."""
    written = 0
    reserved = []  # an AsyncWriter's buffer the conversion wrote into: handed over without a copy

    def into(n, dtype):
        buf = fh.reserve(n * np.dtype(dtype).itemsize)
        reserved.append(buf)
        return buf[: n * np.dtype(dtype).itemsize].view(dtype)

    for chunk in converted(t, base_dir, want, scale, progress, into=into if isinstance(fh, AsyncWriter) else None):
        if reserved:
            fh.commit(reserved.pop(), chunk.nbytes)
        else:
            # as bytes: a buffer of ml_dtypes' float8 (FLOAT8E4M3FN weights) has no memoryview format
            fh.write(memoryview(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)))
        written += chunk.nbytes
    return written


def tensor_bytes(t: TensorProto, base_dir: Path, want: int, progress=None) -> bytes:
    """`t` converted to `want` as one bytes object (inline storage: small tensors or no external data)."""
    out = np.empty(stored(t) if want == t.data_type else numel(t), np_dtype(want))
    pos = 0
    for chunk in converted(t, base_dir, want, progress=progress):
        out[pos:pos + chunk.size] = chunk
        pos += chunk.size
    return out.tobytes()


class AsyncWriter:
    """Writes on a second thread, so reading and converting the next chunk overlaps the write: 2x faster
    on a busy disk (bench). `write` copies into one of a few recycled buffers (a memcpy is far cheaper
    than fresh pages); a write error surfaces on the next call. Few buffers (depth + 1 of CHUNK_BYTES):
    the ones in flight stay in the CPU's cache (see CHUNK_BYTES)."""

    def __init__(self, fh, depth: int = 2):
        self.fh = fh
        self._todo: queue.Queue = queue.Queue(maxsize=depth)
        self._free: queue.Queue = queue.Queue()
        self._nbufs, self._max = 0, depth + 1
        self._err: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="weight-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._todo.get()) is not None:
            buf, n = item
            if self._err is None:
                try:
                    self.fh.write(buf[:n])
                except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                    self._err = exc
            self._free.put(buf)

    def _buffer(self, n: int) -> np.ndarray:
        if self._free.empty() and self._nbufs < self._max:
            self._nbufs += 1
            return np.empty(max(n, CHUNK_BYTES), np.uint8)
        buf = self._free.get()
        return buf if buf.size >= n else np.empty(n, np.uint8)

    def write(self, data) -> None:
        src = np.frombuffer(data, np.uint8)
        buf = self.reserve(src.size)
        buf[: src.size] = src
        self.commit(buf, src.size)

    def reserve(self, n: int) -> np.ndarray:
        """A free buffer of at least n bytes to fill, then to pass to commit()."""
        if self._err is not None:
            raise self._err
        return self._buffer(n)

    def commit(self, buf: np.ndarray, n: int) -> None:
        """Queue the first n bytes of a reserve()d buffer for writing."""
        self._todo.put((buf, n))

    def close(self) -> None:
        """Drain the queue, close the file; raises the first write error."""
        if self._thread.is_alive():
            self._todo.put(None)
            self._thread.join()
        self.fh.close()
        if self._err is not None:
            raise self._err


SAFETENSORS_DTYPES = {TensorProto.FLOAT16: "F16", TensorProto.FLOAT: "F32", TensorProto.BFLOAT16: "BF16"}


def write_safetensors(path: Path, key: str, t: TensorProto, base_dir: Path, want: int, scale: float | None = None,
                      progress=None) -> None:
    """A one-tensor .safetensors file, streamed; byte for byte what safetensors.numpy.save_file writes."""
    nbytes = numel(t) * np_dtype(want).itemsize
    header = json.dumps({key: {"dtype": SAFETENSORS_DTYPES[want], "shape": list(t.dims), "data_offsets": [0, nbytes]}},
                        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    fh = AsyncWriter(open(path, "wb"))
    try:
        fh.write(len(header).to_bytes(8, "little"))
        fh.write(header)
        write_tensor(t, base_dir, want, fh, scale=scale, progress=progress)
    finally:
        fh.close()


# ---------------------------------------------------------------- inline weights without a second copy

_GRAPH = 7  # field numbers (onnx.proto): ModelProto.graph,
_INITIALIZER = 5  # GraphProto.initializer,
_RAW_DATA = 9  # TensorProto.raw_data


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field_header(number: int, length: int) -> bytes:
    """Tag and length of a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(length)


def save_inline(model, path: Path, streamed: list, base_dir: Path, progress=None) -> list[tuple[str, int, int]]:
    """Save `model` plus `streamed` initializers [(source TensorProto, output type)] as one .onnx file.

    onnx.save_model needs every weight in the proto and then a serialized copy of it all: twice the
    weights in memory (2.4 GB for a 0.5B model). Here the weights are streamed from their source
    instead: protobuf merges repeated occurrences of a message field, so after the model itself each
    weight is appended as one more `graph { initializer { ...meta...; raw_data: <streamed> } }`. Any
    protobuf reader (onnx, onnxruntime, TensorRT) reads back the same model.
    Returns (name, offset, length) of each weight's bytes in the file.
    """
    from onnx import TensorProto

    fh = AsyncWriter(open(path, "wb"))
    where, pos = [], 0
    try:
        head = model.SerializeToString()
        fh.write(head)
        pos += len(head)
        for src, want in streamed:
            doc = "" if derived(src) else src.doc_string
            meta = TensorProto(name=src.name, data_type=want, dims=src.dims, doc_string=doc)
            meta_bytes = meta.SerializeToString()
            raw_len = nbytes(src, want)
            tensor_len = len(meta_bytes) + len(_field_header(_RAW_DATA, raw_len)) + raw_len
            graph_len = len(_field_header(_INITIALIZER, tensor_len)) + tensor_len
            head = (_field_header(_GRAPH, graph_len) + _field_header(_INITIALIZER, tensor_len) + meta_bytes
                    + _field_header(_RAW_DATA, raw_len))
            fh.write(head)
            where.append((src.name, pos + len(head), raw_len))
            if write_tensor(src, base_dir, want, fh, progress=progress) != raw_len:
                raise AssertionError(f"wrote the wrong number of bytes for '{src.name}'")
            pos += len(head) + raw_len
    finally:
        fh.close()
    return where
