"""What the text (export.py) and VLM (vlm.py) export routes share: the checks run before a model is loaded
(`check_device`, `_check_checkpoint`), the fast trace (`_light_decomposition`, `_no_stack_traces`), the lean
onnxscript optimization (`_optimize`) and the copy of a kept baseline (`_keep`)."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from onnx_rewriter.errors import RewriteError
from onnx_rewriter.features import wa_checkpoint
from onnx_rewriter.hf import checkpoint_check, checkpoint_refs, lowering
from onnx_rewriter.modelio.config_file import read_config
from onnx_rewriter.modelio.output import OutputDir


@contextlib.contextmanager
def _no_stack_traces():
    """torch.fx records the Python stack of every traced op (~1 s of a 0.5B export); the baseline keeps it only
    as node metadata (`pkg.torch.onnx.stack_trace`), which the rewrite never reads or writes."""
    import torch.fx

    was = torch.fx.config.do_not_emit_stack_traces
    torch.fx.config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        torch.fx.config.do_not_emit_stack_traces = was


@contextlib.contextmanager
def _light_decomposition():
    """torch.onnx's decomposition step, skipped when renaming a few ops is exact (lowering.py): 23 s less
    on a 24-layer 0.5B model. torch's own step whenever the graph needs it or torch's internals move."""
    try:
        from torch.onnx._internal.exporter import _core, _fx_passes

        full = _core._prepare_exported_program_for_export
    except (ImportError, AttributeError):
        yield
        return
    def prepare(program, *, registry):
        if not lowering.lower(program, registry):
            return full(program, registry=registry)
        import torch

        with torch.fx.experimental._config.patch(backed_size_oblivious=True):  # as torch's own step does
            gm = program.graph_module
            if lowering.needs_type_promotion(gm):
                _fx_passes.insert_type_promotion_nodes(gm)
            program._graph_module = _fx_passes.remove_assertion_nodes(gm)
        return program

    _core._prepare_exported_program_for_export = prepare  # looked up by _core.export at call time
    try:
        yield
    finally:
        _core._prepare_exported_program_for_export = full


def _optimize(prog, keep_weights: bool = False) -> None:
    """torch's default optimization (onnxscript) minus its multi-output rewrite rules (SlicesSplit).

    Those try each candidate node against every node of the graph: quadratic, ~57 of the 67 s the
    optimizer takes on a 24-layer 0.5B model, and they never fire on decoder graphs, so the graph is
    node for node the default one (tests/test_scale.py). Default optimization if onnxscript's
    internals ever change shape.

    `keep_weights`: leave `Transpose(weight)` unfolded (onnxscript folds it even for large weights), so
    the weights stay the checkpoint's bytes and the baseline can reference them (checkpoint_refs.py);
    the rewrite folds those transposes while writing (modelio/normalize.py, stream.py).
    """
    try:
        from onnxscript import optimizer, rewriter

        default = rewriter._DEFAULT_REWRITE_RULES
        lean = tuple(_by_root_op(r) for r in default if r._target_pattern.has_single_output_node)
    except (ImportError, AttributeError):
        prog.optimize()
        return

    def should_fold(node):
        if keep_weights and node.op_type == "Transpose" and node.domain in ("", "ai.onnx"):
            x = node.inputs[0]  # a model's own tensor (torch's TorchTensor), not a folded constant
            if x is not None and x.is_initializer() and hasattr(x.const_value, "raw"):
                return False
        return None  # onnxscript's own rules

    rewriter._DEFAULT_REWRITE_RULES = lean  # read by onnxscript's optimize_ir at call time
    try:
        optimizer.optimize_ir(prog.model, should_fold=should_fold)  # what prog.optimize() runs
    finally:
        rewriter._DEFAULT_REWRITE_RULES = default


class _RootOpRule:
    """An onnxscript rule tried only on nodes of its pattern's root op type.

    onnxscript tries every rule on every node (~10 us per try, whatever the op): 47 rules x 7.8k nodes took
    ~4 s of a 0.5B export. A single-output pattern's first check is its root node's op type, so skipping
    the other nodes changes no match: the same rewrites, in the same order.
    """

    def __init__(self, rule, op_type: str):
        self._rule, self._op_type = rule, op_type

    def __getattr__(self, name):  # everything else (name, remove_nodes, visitors, ...) is the rule's
        return getattr(self._rule, name)

    def try_rewrite(self, model, graph_or_function, node, **kwargs):
        if node.op_type != self._op_type:
            return None
        return self._rule.try_rewrite(model, graph_or_function, node, **kwargs)


def _by_root_op(rule):
    """`rule` behind the op-type prefilter where its root op is a constant and its matcher starts there
    (onnxscript's SimplePatternMatcher); the rule itself otherwise."""
    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher

        op_id = rule._target_pattern.output_node.op_identifier()
        if op_id is None or type(rule._matcher) is not SimplePatternMatcher:
            return rule
    except (ImportError, AttributeError, ValueError):  # onnxscript's internals moved: every node is tried
        return rule
    return _RootOpRule(rule, op_id[1])


def trace_dtype(config) -> str:
    """What `export` traces a checkpoint in: its own dtype when that is bf16 or fp16 (its weights then mapped
    from the files, never read or cast: half the memory and bytes of fp32), else fp32."""
    dt = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)).removeprefix("torch.")
    return dt if dt in ("bfloat16", "float16") else "float32"


def check_device(device: str) -> None:
    """--device names a device this torch has (a CPU build has no cuda), before the model is loaded."""
    import re

    if device == "cpu":
        return
    if not re.fullmatch(r"(cuda|mps|xpu)(:\d+)?", device):
        raise RewriteError(f"unknown --device '{device}'; choose cpu, cuda or cuda:N")
    import torch

    kind = device.split(":")[0]
    backend = getattr(torch, kind, None)
    if backend is None or not backend.is_available():
        raise RewriteError(f"--device {device}: this torch ({torch.__version__}) has no usable {kind} device; "
                           f"use --device cpu (or install a torch build with {kind} support)")
    if ":" in device and int(device.split(":")[1]) >= backend.device_count():
        raise RewriteError(f"--device {device}: only {backend.device_count()} {kind} device(s); use {kind}:0")


def _checkpoint_folder(model: str) -> Path | None:
    """The local folder the checkpoint is read from (a folder given, or the HF cache snapshot)."""
    if Path(model).is_dir():
        return Path(model)
    files = checkpoint_refs.checkpoint_files(model) if not model.startswith((".", "/")) else []
    return files[0].parent if files else None


# Quantized checkpoints the export routes read (features/wa_checkpoint.py names the others; they are refused).
EXPORTED_QUANT = ("int4", "block_fp8", "fp8", "int8_sq", "nvfp4", "w4a16_nvfp4", "mxfp8", "mixed")
_QUANT_FIX = {
    "compressed_tensors": "dequantize it to fp16/bf16 first (NVIDIA's exporter would read it as fp16, wrongly)",
    "unknown": "export the fp16/bf16 model it was made from",
}
_WA_FIX = ("of the weight+activation quantized checkpoints only ModelOpt FP8, INT8-SQ, NVFP4, W4A16_NVFP4, MXFP8 "
           "and MIXED_PRECISION are exported: export the fp16/bf16 model it was made from")


def check_quantization(folder: Path | None) -> wa_checkpoint.Format | None:
    """The checkpoint's quantization format when an export route reads it (INT4, block-FP8, FP8, INT8-SQ), None
    when it is not quantized; any other format is refused in one line naming it, never read as fp16 by accident."""
    if folder is None or not Path(folder).is_dir():
        return None
    fmt = wa_checkpoint.detect(folder)
    if fmt is None:
        return None
    if fmt.scheme == "int4":
        qc = read_config(Path(folder) / "config.json").get("quantization_config") \
            if (Path(folder) / "config.json").is_file() else None
        if not isinstance(qc, dict):
            raise RewriteError(f"'{folder}': {fmt.name} has no quantization_config in config.json, which the INT4 "
                               f"route reads; add ModelOpt's quantization_config (quant_method modelopt) to it")
        return fmt
    fmt.refuse_unless(EXPORTED_QUANT, f"'{folder}'", _QUANT_FIX.get(fmt.scheme, _WA_FIX))
    return fmt


def _check_checkpoint(folder: Path | None) -> None:
    """The quantization format (check_quantization), then config.json against the safetensors headers: sizes
    agree, no file truncated (checkpoint_check.py)."""
    check_quantization(folder)
    if folder is None or not (folder / "config.json").is_file():
        return
    config = read_config(folder / "config.json", fix="replace it with the model's HF config.json")
    for index in sorted(folder.glob("*.safetensors.index.json")):  # a shard it names is gone: say which
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise RewriteError(f"cannot read '{index}' (a JSON object with a weight_map); download it again") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise RewriteError(f"'{index}' names {len(missing)} shard(s) that are missing in '{folder}' "
                               f"({', '.join(missing[:3])}); download them again")
    checkpoint_check.check(sorted(folder.glob("*.safetensors")), config, str(folder / "config.json"))


def _keep(work: Path, keep_baseline, force: bool) -> None:
    """Copy the baseline folder to `keep_baseline`, atomically like any output (links into the checkpoint
    become copies: the kept baseline must not depend on where the checkpoint lies)."""
    with OutputDir(keep_baseline, force=force) as tmp:
        for f in sorted(work.iterdir()):
            if f.is_file():
                shutil.copy2(f.resolve(), tmp / f.name)
