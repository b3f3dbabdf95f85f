"""The model of a checkpoint with its weights mapped from the safetensors files, never read, to trace it.

The trace needs the weights' shapes and dtypes, never their values. The model is built from config.json
with its parameters on the meta device (no memory), then each parameter becomes the checkpoint tensor of
its name, mapped into memory (checkpoint_refs.map_tensor): a CPU tensor like a loaded one, so the trace
gives the loaded model's graph (a model left on the meta device does not: the meta kernels give other
strides, e.g. sdpa's output, and the graph gains a copy), yet no page of it is read unless onnxscript
folds it (small tensors such as Gemma's norm weights). checkpoint_refs.save references each mapped
weight where it lies without comparing bytes, and the rewrite streams them from the shards. The export's
peak no longer grows with the model (~2.3 bytes per parameter when loaded).

`mapped_model` returns None, saying why in the log, where that would not be the loaded model: a
quantized checkpoint (dequantized on load), a device other than the CPU, no safetensors files, a model
type transformers converts on load (MoE experts fused, ...), or a parameter the checkpoint holds under
no name of it, or in another shape or dtype (computed or cast on load; keys transformers only renames on
load are renamed here too), or when ONNX_REWRITER_LOAD_WEIGHTS is set. The caller then loads the model as
before.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import mmap
import os
import warnings
from pathlib import Path

from ..errors import RewriteError
from . import checkpoint_refs

log = logging.getLogger(__name__)

# Set (not "0"): every export loads the model as before the mapping existed (to compare, or to step around it).
LOAD_WEIGHTS = "ONNX_REWRITER_LOAD_WEIGHTS"

# torch dtype names -> onnx_ir DataType names (those of checkpoint_refs._DTYPES)
_TORCH = {"torch.bfloat16": "BFLOAT16", "torch.float16": "FLOAT16", "torch.float32": "FLOAT",
          "torch.float64": "DOUBLE", "torch.int64": "INT64", "torch.int32": "INT32", "torch.int8": "INT8",
          "torch.uint8": "UINT8", "torch.bool": "BOOL"}


@contextlib.contextmanager
def params_on_meta():
    """Every nn.Parameter registered inside goes to the meta device (no memory); buffers are made as usual."""
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def mapped_model(model: str, config, dtype, files, device: str = "cpu", trust_remote_code: bool = False,
                 quantized: bool = False, attn_implementation: str | None = "sdpa", auto=None):
    """`model`'s transformers model with its weights mapped from `files` (safetensors); or None.

    `auto`: the transformers Auto class that builds it (AutoModelForCausalLM by default; the VLM route
    passes AutoModelForImageTextToText). `attn_implementation` None: the class's default, as from_pretrained
    without one."""
    why = _refusal(config, files, device, quantized)
    if why is None:
        if auto is None:
            from transformers import AutoModelForCausalLM as auto

        attn = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        try:
            with warnings.catch_warnings(), params_on_meta():
                warnings.simplefilter("ignore")
                # a copy: from_config sets its dtype fields, and the folder echoes the checkpoint's own config
                m = auto.from_config(copy.deepcopy(config), dtype=dtype, trust_remote_code=trust_remote_code, **attn)
        except ValueError:  # what from_pretrained would raise too (e.g. no sdpa here): the caller's to handle
            raise
        except Exception as exc:
            why = f"the model cannot be built from its config alone ({type(exc).__name__})"
        else:
            entries = checkpoint_refs.index(_loaded(files))
            renamed = _renamed(m, entries)
            why = (_map_weights(m, renamed) if isinstance(renamed, dict)
                   else renamed or f"transformers converts {type(m).__name__} checkpoints on load")
            if why is None:
                return m.eval()
    log.info("export: the model is loaded to trace it (%s)", why)
    return None


def _map_weights(m, entries) -> str | None:
    """Make each meta parameter of `m` its checkpoint tensor, mapped; why not (and `m` unusable), or None."""
    import torch

    meta = [b for b, t in m.named_buffers() if t.device.type == "meta"]
    if meta:
        return f"buffer {meta[0]} is on the meta device"
    occurrences: dict[int, list[tuple]] = {}  # tied weights: one tensor under several names
    for name, p in m.named_parameters(remove_duplicate=False):
        occurrences.setdefault(id(p), []).append((name, p))
    plan = []
    for places in occurrences.values():
        p = places[0][1]
        dtype = _TORCH.get(str(p.dtype))
        entry = next((entries[n] for n, _ in places if n in entries and entries[n].shape == tuple(p.shape)
                      and entries[n].dtype == dtype), None)
        if entry is None:
            return (f"the checkpoint holds no {places[0][0]} of shape {tuple(p.shape)} and dtype "
                    f"{str(p.dtype).removeprefix('torch.')}")
        plan.append((places, entry))
    _check_sizes(entry for _, entry in plan)
    mappings = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frombuffer warns that the mapping is read-only: the trace never writes
        for places, entry in plan:
            if entry.file not in mappings:
                with open(entry.file, "rb") as fh:
                    mappings[entry.file] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            weight = torch.nn.Parameter(checkpoint_refs.map_tensor(entry, mappings[entry.file], places[0][1].dtype),
                                        requires_grad=False)
            for name, _ in places:
                owner, _, leaf = name.rpartition(".")
                m.get_submodule(owner)._parameters[leaf] = weight
    return None


def _renamed(m, entries: dict):
    """`entries` under the names transformers gives the checkpoint's keys on load (its renamings, e.g. a
    Qwen2.5-VL checkpoint's `visual.*` and `model.layers.*` are the model's `model.visual.*` and
    `model.language_model.layers.*`), the checkpoint's own names kept too; None where transformers does more
    than rename (a tensor converted: the model is loaded)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings

        transforms = get_model_conversion_mapping(m)
        if any(not isinstance(t, WeightRenaming) for t in transforms):
            return None
        return {**entries, **{apply_renamings(k, transforms): e for k, e in entries.items()}}
    except Exception:  # transformers' internals moved: the checkpoint's own names
        return entries


def _check_sizes(entries) -> None:
    """Each file is as long as the tensors mapped from it need (a shard truncated since the checks before the
    load, or one whose header is whole but data short): a page past the end of a file read through its
    mapping is a SIGBUS, not an error."""
    need: dict = {}
    for e in entries:
        need[e.file] = max(need.get(e.file, 0), e.offset + e.length)
    for f, end in sorted(need.items()):
        size = Path(f).stat().st_size
        if size < end:
            raise RewriteError(f"checkpoint file '{f}' is truncated ({size} bytes, its header needs {end}); "
                               f"download or save it again")


def _loaded(files) -> list:
    """Of the checkpoint's safetensors files, those from_pretrained loads: the shards its index names, else
    model.safetensors (a stray copy beside them, e.g. an fp32 one, is not the model)."""
    folder = Path(files[0]).parent
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return []
        return [f for f in files if Path(f).name in shards]
    return [f for f in files if Path(f).name == "model.safetensors"]


def _refusal(config, files, device: str, quantized: bool) -> str | None:
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    if os.environ.get(LOAD_WEIGHTS, "").strip() not in ("", "0"):
        return f"{LOAD_WEIGHTS} is set"
    if device != "cpu":
        return f"--device {device}"
    if quantized:
        return "a quantized checkpoint: its weights are dequantized on load"
    if not files or not _loaded(files):
        return "no safetensors files to map"
    try:
        converted = get_checkpoint_conversion_mapping(getattr(config, "model_type", None))
    except Exception:  # transformers' internals moved: assume the worst
        converted = True
    if converted:
        return f"transformers converts {getattr(config, 'model_type', '?')} checkpoints on load"
    return None
