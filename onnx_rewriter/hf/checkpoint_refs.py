"""Save the exported baseline with its weights left where they already are: in the checkpoint.

A safetensors file is a JSON header followed by raw little-endian row-major tensors, which is exactly
what ONNX external data points at (location, offset, length). So each initializer that is byte for byte
a checkpoint tensor is written as a reference into that file (linked next to the baseline) instead of
copying a gigabyte into `model.onnx.data` only for the rewrite to read it back: 9 of the ~35 s of a
0.5B export. Every reference is checked by comparing bytes; the rest (computed constants, tensors the
model changed on load, dtypes the checkpoint does not have) is saved the usual way.

A model whose weights are the checkpoint's files mapped into memory (mapped_model.py) needs no comparison,
which would read every page of them: a tensor whose memory is the mapping of a checkpoint tensor's bytes
(`map_tensor`) is those bytes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..modelio.safetensors_header import read_header

log = logging.getLogger(__name__)

# safetensors dtype names -> onnx_ir DataType names
_DTYPES = {"BF16": "BFLOAT16", "F16": "FLOAT16", "F32": "FLOAT", "F64": "DOUBLE", "I64": "INT64", "I32": "INT32",
           "I8": "INT8", "U8": "UINT8", "BOOL": "BOOL"}


@dataclass(frozen=True)
class Entry:
    file: Path
    dtype: str  # onnx_ir DataType name
    shape: tuple
    offset: int  # from the start of the file
    length: int


def index(files) -> dict[str, Entry]:
    """Tensor name -> where its bytes lie, from the headers of `files` (no tensor is read)."""
    out = {}
    for f in files:
        header = read_header(f)
        for name, info in header.tensors.items():
            if info.get("dtype") not in _DTYPES:
                continue
            start, end = info["data_offsets"]
            out[name] = Entry(Path(f), _DTYPES[info["dtype"]], tuple(info["shape"]), header.data_start + start,
                              end - start)
    return out


def checkpoint_files(model: str) -> list[Path]:
    """The safetensors files of `model` (a folder, or an HF id already in the local cache); [] if none."""
    folder = Path(model)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(model, local_files_only=True, allow_patterns=["*.safetensors"]))
        except Exception:  # not cached, or an odd layout: the baseline keeps its own copy of the weights
            return []
    return sorted(folder.glob("*.safetensors"))


# data_ptr of a tensor made by map_tensor -> (the checkpoint tensor, the mapping it lies in); `unmap` forgets them.
_MAPPED: dict[int, tuple[Entry, object]] = {}


def map_tensor(entry: Entry, mapping, torch_dtype):
    """The bytes of `entry` as a CPU tensor over `mapping` (an mmap of entry.file): nothing is read."""
    import torch

    count = entry.length // torch.empty((), dtype=torch_dtype).element_size()
    t = torch.frombuffer(mapping, dtype=torch_dtype, count=count, offset=entry.offset).view(entry.shape)
    _MAPPED[t.data_ptr()] = (entry, mapping)
    return t


def maps(model) -> bool:
    """Whether any parameter of `model` is a tensor of map_tensor (mapped_model.py built it)."""
    return any(p.data_ptr() in _MAPPED for p in model.parameters())


def unmap() -> None:
    """Forget the tensors of map_tensor (their mappings close once no tensor holds them)."""
    _MAPPED.clear()


def _mapped(raw, dtype: str) -> Entry | None:
    """The checkpoint tensor whose mapped bytes `raw` is (map_tensor), when its dtype and shape are the entry's:
    the same memory as the file's bytes, so nothing needs comparing."""
    entry, mapping = _MAPPED.get(raw.data_ptr(), (None, None))
    if entry is None:
        return None
    try:
        at = np.frombuffer(mapping, np.uint8).ctypes.data + entry.offset
    except (ValueError, TypeError):  # the mapping was closed
        return None
    same = (at == raw.data_ptr() and raw.is_contiguous() and dtype == entry.dtype and tuple(raw.shape) == entry.shape
            and raw.numel() * raw.element_size() == entry.length)
    return entry if same else None


def save(program, path: Path, model, files) -> None:
    """Save torch's ONNXProgram `program` (exported from `model`) to `path`, referencing checkpoint bytes."""
    import onnx_ir as ir
    import torch

    entries = index(files) if files else {}
    by_storage: dict[tuple, list[str]] = {}  # tied weights: lm_head.weight is model.embed_tokens.weight
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, p in tensors:
        by_storage.setdefault((p.data_ptr(), tuple(p.shape)), []).append(name)

    base, links, shared, own = path.parent, {}, 0, []
    base.mkdir(parents=True, exist_ok=True)
    for value in program.model.graph.initializers.values():
        tensor = value.const_value
        raw = getattr(tensor, "raw", None)
        entry = None
        if isinstance(raw, torch.Tensor) and raw.is_contiguous() and raw.numel() > 0:
            names = [value.name.removeprefix("m.")] + by_storage.get((raw.data_ptr(), tuple(raw.shape)), [])
            entry = _mapped(raw, tensor.dtype.name) or next(
                (entries[n] for n in names if n in entries and _same(raw, tensor.dtype.name, entries[n])), None)
        if entry is not None and entry.file not in links:
            links[entry.file] = _link(entry.file, base / f"checkpoint-{len(links)}.safetensors")
        if entry is None or links[entry.file] is None:
            if tensor is not None and tensor.nbytes > 1024:
                own.append(value)
            continue
        value.const_value = ir.ExternalTensor(links[entry.file], entry.offset, entry.length, tensor.dtype,
                                              shape=tensor.shape, name=value.name, base_dir=str(base))
        shared += entry.length
    if own:  # everything else large goes to model.onnx.data, as torch's own save would put it
        ext = ir.external_data.convert_tensors_to_external([v.const_value for v in own], str(base),
                                                           f"{path.name}.data")
        for v, t in zip(own, ext):
            v.const_value = t
    ir.save(program.model, str(path))
    log.info("baseline: %.0f MB of weights referenced in the checkpoint, %d tensors saved with it",
             shared / 1e6, len(own))


def _same(raw, dtype: str, entry: Entry, chunk: int = 16 << 20) -> bool:
    """Whether torch tensor `raw` holds exactly the bytes of `entry` (read in chunks: a memory map of the
    checkpoint would count in the resident set next to the model's own copy)."""
    import torch

    if dtype != entry.dtype or tuple(raw.shape) != entry.shape:
        return False
    mine = raw.detach().view(-1).view(torch.uint8).numpy()
    if mine.size != entry.length:
        return False
    buf = np.empty(min(chunk, entry.length), np.uint8)
    with open(entry.file, "rb", buffering=0) as fh:
        fh.seek(entry.offset)
        for start in range(0, entry.length, chunk):
            view = buf[: min(chunk, entry.length - start)]
            if fh.readinto(view) != view.size or not _equal(view, mine[start:start + view.size]):
                return False
    return True


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Byte arrays equal, compared 8 bytes at a time (twice numpy's byte-wise array_equal)."""
    n = a.size - a.size % 8
    return np.array_equal(a[:n].view(np.uint64), b[:n].view(np.uint64)) and np.array_equal(a[n:], b[n:])


def _link(src: Path, dst: Path) -> str | None:
    """Make `src` reachable as `dst` (hard link, else symbolic link): dst's name, or None if neither works."""
    src = src.resolve()  # HF cache snapshots are themselves links into blobs/
    for make in (os.link, os.symlink):
        try:
            make(src, dst)
            return dst.name
        except OSError as exc:
            why = exc
    log.info("cannot link %s beside the baseline (%s): its weights are copied", src, why)
    return None
