"""HF checkpoint -> baseline ONNX (plain torch.onnx.export, no KV cache) -> rewrite.

The baseline is `input_ids`, `attention_mask` -> `logits` with dynamic batch and sequence, exported with
the dynamo exporter in the checkpoint's dtype when that is bf16 or fp16, else in fp32 (the rewriter converts
to the output dtype tensor by tensor while writing). What makes it fast changes nothing it computes: torch's retracing
decomposition is skipped where renaming a few ops is exact (lowering.py), onnxscript's quadratic
multi-output rules are skipped and its other rules are tried only on nodes of their root op type
(`_optimize`), torch.fx records no Python stack per traced op (the baseline's nodes carry no
`pkg.torch.onnx.stack_trace`), and weights stay in the checkpoint's safetensors files, referenced rather
than copied (checkpoint_refs.py).
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import pickle
import re
import shutil
import socket
import threading
import warnings
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from onnx_rewriter import safety
from onnx_rewriter.features import wa_checkpoint, wa_quant
from onnx_rewriter.features.int4 import checkpoint as quantized_checkpoint
from onnx_rewriter.features.moe import support as moe_support
from onnx_rewriter.hf import checkpoint_refs
from onnx_rewriter.pipeline import steps as pipeline

from .. import progress
from ..errors import RewriteError, UnsupportedModel
from ..features.fp8_kv import has_checkpoint_scales
from ..modelio.config_file import read_config
from ..sidefiles.config_json import _get, _llm_part
from ..sidefiles.tokenizer import load_tokenizer
from ..sidefiles.writer import check_tokenizer_rows
from .mapped_model import mapped_model
from .trace import (
    _check_checkpoint,
    _checkpoint_folder,
    _keep,
    _light_decomposition,
    _no_stack_traces,
    _optimize,
    check_device,
    check_quantization,
    trace_dtype,
)
from .vlm import export_vlm, vlm_type

log = logging.getLogger(__name__)


def load_model(model: str, device: str = "cpu", trust_remote_code: bool = False, attn_implementation: str = "sdpa",
               torch_dtype: str = "float32", mapped_files=()):
    """AutoModelForCausalLM from an HF id or a local folder, with errors a user can act on.

    `torch_dtype` "float32" (default: the baseline is exported in fp32 and narrowed tensor by tensor
    while writing), "auto" (the checkpoint's own dtype, e.g. to export a bf16 graph) or "export"
    (bf16 for bf16 checkpoints, fp32 otherwise).

    `mapped_files`: the checkpoint's safetensors files, to build the model with its weights mapped from them
    (mapped_model.py: to trace it, nothing is read) where they hold each weight; loaded otherwise.
    """
    local = Path(model).is_dir()
    if not local and (Path(model).exists() or model.startswith((".", "/"))):
        raise RewriteError(f"'{model}' is not a checkpoint folder; give an HF model id or a folder with config.json")
    hub = hub_kwargs(model)
    if hub and not _in_hf_cache(model):  # say so before the slow torch/transformers imports
        raise RewriteError(f"cannot fetch '{model}': {_offline_reason()} and it is not in the local HF cache; "
                           f"download it where there is network and pass the local folder (--model path/to/folder)")

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .. import safety

    trust = safety.remote_code(trust_remote_code)["trust_remote_code"]  # and never a prompt
    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust, **hub)
    except OSError as exc:
        if local:
            raise RewriteError(f"'{model}' has no readable config.json ({str(exc).splitlines()[0][:100]})") from None
        if hub:
            raise RewriteError(f"cannot fetch '{model}': {_offline_reason()} and it is not in the local HF cache; "
                               f"download it where there is network and pass the local folder "
                               f"(--model path/to/folder)") from None
        raise RewriteError(f"cannot fetch '{model}' from the model hub (no network, or no such model); "
                           f"download it elsewhere and pass the local folder") from None
    except ValueError as exc:
        raise safety.remote_code_error(exc, model) or RewriteError(
            f"unsupported model in '{model}': {str(exc).splitlines()[0][:160]}") from None
    why = moe_support.refusal(config.to_dict(), generic=False)  # a hub id: its config was not read before
    if why is not None:
        raise UnsupportedModel(f"'{model}': {why}")
    moe = {}
    if moe_support.experts(config.to_dict()):
        # transformers' default "grouped_mm" experts do not convert to ONNX and "eager" does not trace; "batched_mm"
        # exports the form patterns/moe_block.py reads (docs/contract.md, "Mixture-of-Experts decoders")
        config._experts_implementation = "batched_mm"
        moe = {"experts_implementation": "batched_mm"}
    if getattr(config, "is_encoder_decoder", False):
        raise RewriteError(f"'{model}' is an encoder-decoder model ({getattr(config, 'model_type', '?')}); "
                           f"onnx_rewriter handles decoder-only causal LMs (Llama, Qwen, Mistral, Phi-3, Gemma, ...)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dtype = torch.float32 if torch_dtype == "float32" else torch_dtype
            if torch_dtype == "export":  # what `export` uses: bf16/fp16 checkpoints stay as they are, the rest fp32
                dtype = getattr(torch, trace_dtype(config))
            folder = Path(model) if local else _checkpoint_folder(model)  # a hub id: its cached snapshot
            fmt = check_quantization(folder)
            # INT4 from a hub id stays transformers' own load, as before; FP8 / block-FP8 always read here
            quantized = fmt is not None and (local or fmt.scheme in READ_HERE)
            m = (mapped_model(model, config, dtype, mapped_files, device, trust, quantized, attn_implementation)
                 if mapped_files else None)
            if m is not None:
                log.info("export: traced with the weights mapped from the checkpoint, not loaded")
                return m, config
            if quantized and fmt.scheme in READ_HERE:  # their fp16 weights (contract part 3 16.7)
                m, config = _load_fp16_weights(folder, config, fmt, attn_implementation)
            elif quantized:  # AWQ / GPTQ / ModelOpt W4A16_AWQ: dequantized weights
                m = _load_quantized(model, config, dtype, attn_implementation)
            else:
                m = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, attn_implementation=attn_implementation,
                                                         trust_remote_code=trust_remote_code, **hub, **moe)
    except ValueError as exc:
        refusal = safety.remote_code_error(exc, model)
        if refusal is not None:
            raise refusal from None
        msg = str(exc).splitlines()[0][:160]
        if attn_implementation == "sdpa" and ("sdpa" in msg.lower() or "scaled_dot_product_attention" in msg):
            return load_model(model, device, trust_remote_code, "eager", torch_dtype, mapped_files)
        raise RewriteError(f"unsupported architecture '{getattr(config, 'model_type', '?')}' ({msg}); onnx_rewriter "
                           f"handles decoder-only causal LMs (Llama, Qwen, Mistral, Phi-3, Gemma, ...)") from None
    except OSError as exc:
        raise RewriteError(f"cannot load the weights of '{model}': {str(exc).splitlines()[0][:160]}") from None
    except (pickle.UnpicklingError, EOFError) as exc:  # a .bin torch will not unpickle safely (or a broken one)
        bins = ", ".join(p.name for p in sorted(Path(model).glob("*.bin"))) if local else "its .bin files"
        why = (str(exc).splitlines() or [type(exc).__name__])[0][:80]
        raise RewriteError(f"cannot load the weights of '{model}': torch refuses to unpickle {bins or 'them'} "
                           f"({why}); give the checkpoint as safetensors") from None
    return m.to(device).eval(), config


_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@functools.lru_cache(maxsize=1)
def _offline_reason() -> str | None:
    """Why the model hub cannot be reached, or None. Asked once, before transformers tries: offline, its
    client retries for ~30 s before giving up."""
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set (offline mode)"
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return None  # through a proxy only the hub client can tell
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    result: list = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=3).close()
            result.append(None)
        except OSError as exc:
            result.append(f"the model hub ({host}) is unreachable: {exc.strerror or exc}")

    t = threading.Thread(target=probe, daemon=True)  # getaddrinfo itself has no timeout
    t.start()
    t.join(5)
    return result[0] if result else f"the model hub ({host}) did not answer within 5 s"


def hub_kwargs(model: str) -> dict:
    """from_pretrained arguments for `model`: local_files_only when it is a hub id and the hub is out of reach."""
    if Path(model).is_dir() or _offline_reason() is None:
        return {}
    log.info("%s; looking for '%s' in the local HF cache only", _offline_reason(), model)
    return {"local_files_only": True}


def _in_hf_cache(model: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except Exception:  # an odd id or cache layout: let transformers decide
        return True


class _LogitsOnly:
    """forward(input_ids, attention_mask) -> logits, without a cache (what the baseline graph computes)."""

    def __new__(cls, model):
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask):
                return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

        return Wrapper(model)


def export_baseline(model, path: Path, device: str = "cpu", exporter: str = "dynamo", opset: int | None = None,
                    checkpoint=()) -> Path:
    """Export an HF model (already loaded) to `path`: dynamo (default) or TorchScript (`exporter="torchscript"`).

    `checkpoint`: the model's safetensors files; a dynamo baseline references the weights found there
    byte for byte instead of copying them (checkpoint_refs.py). The baseline is then only valid while
    those files are.
    """
    import torch

    # torch's exporter warns about optional torchvision ops on every run: not our user's concern.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    ids = torch.ones((2, 8), dtype=torch.int64, device=device)
    mask = torch.ones_like(ids)
    names = dict(input_names=["input_ids", "attention_mask"], output_names=["logits"])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            # Shared named dims: one symbol for batch and one for seq across inputs (shape-based matching).
            batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=32768)
            # Tracing makes millions of short-lived objects: with the cyclic GC off it is 12% faster (41 -> 36 s
            # at 24 layers) for +20 MB; one collection afterwards frees the export's cycles.
            gc_was = gc.isenabled()
            gc.disable()
            # What exists now (modules, the model) outlives the export: the collection below skips it
            # (0.4 s at 0.5B). Not when the caller froze objects of its own: unfreeze() would thaw them too.
            freeze = gc.get_freeze_count() == 0
            if freeze:
                gc.freeze()
            try:
                with _light_decomposition(), _no_stack_traces():
                    prog = torch.onnx.export(_LogitsOnly(model), (ids, mask), dynamo=True, optimize=False,
                                             dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                                             "attention_mask": {0: batch, 1: seq}},
                                             opset_version=opset, verbose=False, **names)
                _optimize(prog, keep_weights=bool(checkpoint))
                checkpoint_refs.save(prog, Path(path), model, checkpoint)
                del prog
            finally:
                if gc_was:
                    gc.enable()
                gc.collect()
                if freeze:
                    gc.unfreeze()
        elif exporter == "torchscript":
            axes = {0: "batch", 1: "seq"}
            torch.onnx.export(_LogitsOnly(model), (ids, mask), str(path), dynamo=False, opset_version=opset or 20,
                              dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": axes}, **names)
        else:
            raise RewriteError(f"unknown exporter '{exporter}'; choose dynamo or torchscript")
    return path


# What a checkpoint folder's tokenizer consists of (copied beside a kept baseline).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def _save_tokenizer(model: str, into: Path, trust_remote_code: bool = False) -> Path | None:
    """A hub checkpoint's tokenizer saved into `into`; None when it has none. A tokenizer that is there
    but cannot be loaded is an error, as on the rewrite route (sidefiles/tokenizer.py)."""
    from transformers import AutoTokenizer

    from .. import safety

    try:
        tok = AutoTokenizer.from_pretrained(model, **hub_kwargs(model), **safety.remote_code(trust_remote_code))
    except OSError as exc:  # no tokenizer files at all: the rewrite warns, as for any baseline without one
        log.info("no tokenizer for '%s': %s", model, str(exc).splitlines()[0][:120])
        return None
    except Exception as exc:
        refusal = safety.remote_code_error(exc, model)
        if refusal is not None:
            raise refusal from None
        why = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
        raise RewriteError(f"cannot load the tokenizer of '{model}': {why}; fix it, pass --tokenizer DIR "
                           f"or --no-tokenizer") from None
    tok.save_pretrained(into)
    return into


def precheck(model: str, output_dir, opts, device: str = "cpu", keep_baseline=None) -> Path | None:
    """What every export route (text, VLM) checks before loading anything: the device, every path it will
    write (safety.check_writes) and the checkpoint's files against its config. Returns the checkpoint folder."""
    check_device(device)
    folder = _checkpoint_folder(model)
    protected = {"the checkpoint": folder}
    if isinstance(opts.eagle_draft, (str, Path)):
        protected["the --eagle-draft checkpoint"] = Path(opts.eagle_draft)
    safety.check_writes(output_dir, opts.force, protected=protected, read=pipeline.read_paths(opts),
                        keep_baseline=keep_baseline, report=opts.report)
    if folder is not None and (folder / "config.json").is_file():  # MoE: refused by name, before its sizes
        config = read_config(folder / "config.json")
        why = moe_support.refusal(config, str(opts.target),
                                  int4=getattr(opts, "quantize", None) == "int4" or moe_support.int4_checkpoint(config),
                                  dense=bool(getattr(opts, "moe_dense", False)))
        if why is not None:
            raise UnsupportedModel(f"'{model}': {why}")
    _check_checkpoint(folder)
    return folder


def _check_tokenizer_rows(tok_dir: Path, folder: Path | None) -> None:
    """The tokenizer's ids fit the checkpoint's vocab_size, before the export (the rewrite checks it again)."""
    try:
        vocab = _get(_llm_part(read_config(folder / "config.json")), "vocab_size")
    except (RewriteError, TypeError, AttributeError):
        return  # a hub id, or no config: the rewrite checks the tokenizer against the graph
    if isinstance(vocab, int) and vocab > 0:
        check_tokenizer_rows(tok_dir / "tokenizer.json", tok_dir, vocab)


def export(model: str, output_dir, target: str | None = None, dtype: str = "float16", device: str = "cpu",
           trust_remote_code: bool = False, force: bool = False, keep_baseline: str | None = None, **options):
    """Export `model` (HF id or folder) and rewrite it into `output_dir`. Returns the rewrite run.

    `keep_baseline`: a folder to keep the baseline export in (model.onnx, config.json, tokenizer files:
    what a later `rewrite` of it needs). Every option is checked before the model is loaded.
    """
    opts = pipeline.make_options(target=target or pipeline.targets.DEFAULT, dtype=dtype, force=force, **options)
    opts.trust_remote_code = opts.trust_remote_code or trust_remote_code
    folder = precheck(model, output_dir, opts, device, keep_baseline)
    fmt = check_quantization(folder)
    if fmt is not None and opts.quantize in ("fp8", "nvfp4", "int8-sq"):  # never quantized twice, nor ignored
        raise UnsupportedModel(f"--quantize {opts.quantize}: '{model}' is already a {fmt.name}; export it without "
                               f"--quantize")
    if fmt is not None and fmt.scheme in wa_quant.SCHEMES:  # the target's refusal (0.5, not fp16), before the load
        wa_quant.check_target(opts.target, opts.dtype, fmt)
        if opts.kv_cache != "fp8" and has_checkpoint_scales(folder):
            log.warning("the checkpoint holds k/v scales: add --kv-cache fp8 to store the KV cache in FP8 with "
                        "them (NVIDIA's exporter does so whenever they exist); the KV cache stays fp16")
    out = Path(output_dir)
    if vlm_type(model):  # Qwen2.5-VL / Qwen3-VL: the two-part llm/ + visual/ folder
        return export_vlm(model, out, opts, device=device, keep_baseline=keep_baseline)
    draft = opts.eagle_draft if isinstance(opts.eagle_draft, (str, Path)) else None
    if opts.eagle_draft is True:
        raise RewriteError("export --eagle-draft needs the draft checkpoint folder: --eagle-draft DIR")
    if draft is not None:  # OUT/base and OUT/draft
        return export_eagle3(model, out, opts, Path(draft), device=device, keep_baseline=keep_baseline)
    return _export_text(model, out, opts, folder, device, keep_baseline)


def export_eagle3(model: str, out: Path, opts, draft: Path, device: str = "cpu", keep_baseline=None):
    """An EAGLE3 pair: OUT/base (the base with --eagle-base, its hidden_states layers the draft's
    target_layer_ids when it has them) and OUT/draft (the draft checkpoint exported and rewritten with
    --eagle-draft), written together (one output folder, renamed into place when both are done)."""
    import copy

    from ..modelio.output import OutputDir
    from .eagle3_draft import export_draft_baseline, load_draft, read_draft_config, target_layer_ids

    cfg = read_draft_config(draft)
    base_opts = copy.copy(opts)
    base_opts.eagle_base, base_opts.eagle_draft, base_opts.force = True, None, False
    if base_opts.eagle_layers is None and target_layer_ids(cfg) is not None:
        base_opts.eagle_layers = target_layer_ids(cfg)
    draft_opts = copy.copy(opts)
    draft_opts.eagle_base, draft_opts.eagle_draft, draft_opts.eagle_layers = False, True, None
    draft_opts.force, draft_opts.tokenizer, draft_opts.report = False, None, None
    draft_opts.no_tokenizer = True
    pipeline.make_options(draft_opts)  # the draft's own refusals (target, dtype), before any work
    folder = _checkpoint_folder(model)
    with OutputDir(out, force=opts.force) as tmp:
        run = _export_text(model, tmp / "base", base_opts, folder, device, keep_baseline)
        m, _ = load_model(model, device, opts.trust_remote_code)
        emb = m.get_input_embeddings().weight.detach().float().clone()
        del m
        with safety.temp_folder("export") as work:
            d = load_draft(draft, base_embedding=emb)
            export_draft_baseline(d, work / "model.onnx")
            del d
            shutil.copyfile(draft / "config.json", work / "config.json")
            pipeline.rewrite(work / "model.onnx", tmp / "draft", draft_opts)
    run.out_dir = out / "base"  # the summary line lists the base folder's files
    return run


def _export_text(model: str, out: Path, opts, folder, device: str, keep_baseline):
    fmt = check_quantization(folder)  # a W+A checkpoint's codes and scales go into Q/DQ pairs (below)
    tok_dir = opts.tokenizer or (Path(model) if Path(model).is_dir() else None)
    if tok_dir is not None and not opts.no_tokenizer:  # a broken tokenizer fails now, as the rewrite would later

        load_tokenizer(tok_dir, opts.trust_remote_code)
        _check_tokenizer_rows(Path(tok_dir), folder)
    with progress.stages(["load", "export", "rewrite"], "export") as advance:
        advance("load")
        # The checkpoint's own dtype when it is bf16: half the memory and bytes of an fp32 export, 4x faster
        # to load, and bf16 values are exact in fp16, the runtime's type (bench/run.py measures it).
        files = checkpoint_refs.checkpoint_files(model)
        m, config = load_model(model, device, opts.trust_remote_code, torch_dtype="export", mapped_files=files)
        with safety.temp_folder("export") as work:
            advance("export")
            with safety.os_errors(f"cannot write the baseline export in '{work}'",
                                  "free some space there or point TMPDIR at a folder with room"):
                try:
                    base = export_baseline(m, work / "model.onnx", device, checkpoint=files)
                finally:
                    del m
                    checkpoint_refs.unmap()  # a mapped model's mappings close with it
                (work / "config.json").write_text(json.dumps(config.to_dict(), default=str))
                # Beside the baseline, where a later rewrite of a kept baseline finds it; a local checkpoint's
                # own tokenizer is read where it is, by the same code as on the rewrite route.
                if opts.tokenizer is None and not opts.no_tokenizer:
                    local = Path(model).is_dir()
                    opts.tokenizer = (Path(model) if local
                                      else _save_tokenizer(model, work, opts.trust_remote_code) or work)
                    if keep_baseline and local:
                        for f in _TOKENIZER_FILES:
                            if (Path(model) / f).is_file():
                                shutil.copyfile(Path(model) / f, work / f)
            if quantized_checkpoint.quantization(config) is not None:  # its own codes go into the INT4 plugin
                opts.quantize, opts.int4_checkpoint = "int4", str(model)
            if fmt is not None and fmt.scheme in wa_quant.SCHEMES:  # its own codes and scales go into Q/DQ pairs
                opts.wa_checkpoint, opts.fuse_qkv = str(folder), False
            if opts.kv_cache == "fp8" and opts.kv_scales is None and Path(model).is_dir():
                if has_checkpoint_scales(model):  # a ModelOpt FP8-KV checkpoint: its own scales, no calibration
                    opts.kv_scales = str(model)
            advance("rewrite")
            run = pipeline.rewrite(base, out, opts)
            if fmt is not None and fmt.scheme == "block_fp8":  # what was done with its weights, in the report
                run.warn(f"{fmt.name}: weights dequantized exactly to fp16 (fp8 x weight_scale_inv of their 128x128 "
                         f"block; no FP8 GEMM: the checkpoint has no activation scales)"
                         + ("; then --quantize int4 re-quantized those fp16 weights (the INT4 rows of the report)"
                            if opts.quantize == "int4" else ""))
            if keep_baseline:
                _keep(work, keep_baseline, opts.force)
            return run


def _load_quantized(folder, config, dtype, attn_implementation: str):
    """The transformers model of a quantized checkpoint, holding its dequantized weights (fp16 values)."""
    import torch

    ck = quantized_checkpoint.Checkpoint(folder)
    state = dict(ck.plain())
    for p in ck.prefixes:
        state[f"{p}.weight"] = np.ascontiguousarray(ck.linear(p).dequantized().T)
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in stack_experts(state).items()}
    model, _ = _plain_model(config, dtype, attn_implementation, state, f"quantized checkpoint '{folder}'")
    return model.to(dtype).eval()


# A checkpoint's per-expert linears (Qwen2/3-MoE gate/up/down_proj, Mixtral w1/w3/w2), which transformers 5 stacks
# on load; _plain_model loads a state as it is, so the stacking is done here.
_EXPERT_LINEAR = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_EXPERT_PART = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


def stack_experts(state: dict) -> dict:
    """Per-expert weights `...experts.{e}.gate_proj.weight` ([I, H]) -> transformers 5's stacked experts:
    `...experts.gate_up_proj` [E, 2I, H] (gate rows first, as its chunk(2) reads them), `...experts.down_proj`
    [E, H, I]. Other tensors pass through; a block whose experts are incomplete is left as it is (the model's
    load then names what is missing)."""
    blocks: dict = {}
    for key in list(state):
        m = _EXPERT_LINEAR.match(key)
        if m:
            blocks.setdefault(m.group(1), {})[(int(m.group(2)), _EXPERT_PART[m.group(3)])] = key
    out = dict(state)
    for prefix, parts in blocks.items():
        n = 1 + max(e for e, _ in parts)
        if set(parts) != {(e, p) for e in range(n) for p in ("gate", "up", "down")}:
            continue
        out[f"{prefix}.gate_up_proj"] = np.stack([np.concatenate([state[parts[(e, "gate")]], state[parts[(e, "up")]]])
                                                  for e in range(n)])
        out[f"{prefix}.down_proj"] = np.stack([state[parts[(e, "down")]] for e in range(n)])
        for key in parts.values():
            del out[key]
    return out


def _plain_model(config, dtype, attn_implementation: str, state: dict, what: str):
    """(model, config) of `config` without its quantization_config (the baseline is a plain model), holding
    `state`; a state that does not fit the config is refused in one line naming `what`."""
    from transformers import AutoModelForCausalLM

    experts = getattr(config, "_experts_implementation", None)  # MoE: batched_mm (load_model), kept
    config = type(config).from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    if experts is not None:
        config._experts_implementation = experts
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RewriteError(f"{what} does not fit its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    return model, config


# Quantized checkpoints whose weights this module reads itself (from a hub id's snapshot too)
READ_HERE = ("block_fp8", "fp8", "int8_sq", "nvfp4", "w4a16_nvfp4", "mxfp8", "mixed")


def _load_fp16_weights(folder, config, fmt, attn_implementation: str):
    """(model, config) of a block-FP8, FP8 or INT8-SQ checkpoint: each quantized weight as the fp16 graph computes
    it (wa_checkpoint.QuantLinear.traced_weight: block-FP8 fp8 * weight_scale_inv of its 128 x 128 block, FP8
    fp8 * fp16(weight_scale), INT8-SQ fp16(int8 * weight_scale) * pre_quant_scale), in an fp32 model (bf16
    would round those fp16 values again); the config loses its quantization_config, so the baseline is a plain
    model. An FP8 / INT8-SQ checkpoint's codes and scales then go into the graph (features/wa_quant.py), found
    by these weights' fp16 bytes."""
    import torch

    ck = wa_checkpoint.Checkpoint(folder, fmt)
    state = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in ck.plain().items()}
    for p in ck.linears:
        state[f"{p}.weight"] = torch.from_numpy(ck.linear(p).traced_weight().astype(np.float32))
    model, config = _plain_model(config, torch.float32, attn_implementation, state, f"{fmt.name} '{folder}'")
    return model.eval(), config
