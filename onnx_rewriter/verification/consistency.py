"""verify's first pass: do the folder's files agree with each other, with the contract and with --model?

The numbers alone cannot see what only the runtime reads: config.json says `kv_cache_dtype` "fp8" beside
an fp16 cache, `vocab_size` 300 beside 320 logits, a tokenizer.json deleted after the rewrite. Each problem
is one line naming the file, and verify FAILS without running numbers (which could not be trusted, or
would crash on the mismatch). Cheap: reads config.json, the graph without its weights, safetensors headers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx

from ..errors import RewriteError
from ..modelio.config_file import read_config
from ..safety import MANIFEST
from ..sidefiles.config_json import REQUIRED_KEYS
from ..sidefiles.tokenizer import tokenizer_rows
from .compare import VerifyResult

SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "max_position_embeddings")
KV_CACHE_DTYPES = {"fp16", "fp8"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# (folder config key, names in the checkpoint's config) compared with --model
MODEL_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
FP8 = onnx.TensorProto.FLOAT8E4M3FN


def _dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def check(out_dir, model: str | None = None, vlm: bool | None = None) -> list[str]:
    """Problems of folder `out_dir` (model.onnx, config.json and embedding.safetensors exist), one line each.

    `model`: the checkpoint verify compares with (its config.json must describe the same model).
    `vlm`: whether that checkpoint is a VLM (None: not known, no check).
    """
    out = Path(out_dir)
    problems: list[str] = []
    cfg_path = out / "config.json"
    try:
        cfg = read_config(cfg_path, fix="rewrite the folder again")
    except RewriteError as exc:
        return [str(exc)]
    problems += _files(out)
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        problems.append(f"{cfg_path}: missing {', '.join(missing)} (the runtime requires them)")
    bad = [k for k in SIZE_KEYS if k in cfg and not (isinstance(cfg[k], int) and not isinstance(cfg[k], bool)
                                                      and cfg[k] > 0)]
    problems += [f"{cfg_path}: {k} is {cfg[k]!r}, not a positive integer" for k in bad]
    sizes = {k: cfg[k] for k in SIZE_KEYS if k in cfg and k not in bad}
    if "kv_cache_dtype" in cfg and cfg["kv_cache_dtype"] not in KV_CACHE_DTYPES:
        problems.append(f"{cfg_path}: kv_cache_dtype {cfg['kv_cache_dtype']!r} is none of "
                        f"{', '.join(sorted(KV_CACHE_DTYPES))}")
    from .. import targets

    versions = {t.edgellm_version: t for t in targets.TARGETS.values()}
    target = versions.get(cfg.get("edgellm_version"))
    if "edgellm_version" in cfg and target is None:
        problems.append(f"{cfg_path}: edgellm_version {cfg['edgellm_version']!r} is none of "
                        f"{', '.join(sorted(versions))}")
    problems += _graph(out, cfg, sizes, target)
    problems += _embedding(out, sizes)
    problems += _vocab_map(out, cfg, sizes)
    tok = out / "tokenizer.json"
    if tok.is_file() and "vocab_size" in sizes:
        try:
            rows = tokenizer_rows(tok)
            if rows > sizes["vocab_size"]:
                problems.append(f"{tok}: token ids reach {rows - 1} but config.json vocab_size is "
                                f"{sizes['vocab_size']} (the embedding's rows); the tokenizer is another model's")
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            problems.append(f"{tok}: not a readable tokenizer ({exc})")
    if model is not None:
        problems += _model(out, cfg, sizes, model, vlm)
    return problems


def _files(out: Path) -> list[str]:
    """Every file the manifest lists is there; without a manifest, the tokenizer files the runtime loads."""
    try:
        listed = json.loads((out / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        listed = list(TOKENIZER_FILES)
    return [f"{out / name}: missing (the runtime reads it); rewrite the folder again" for name in listed
            if isinstance(name, str) and not (out / name).exists()]


def _graph(out: Path, cfg: dict, sizes: dict, target) -> list[str]:
    path = out / "model.onnx"
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one FAIL line
        return [f"{path}: not a readable ONNX model ({type(exc).__name__}); rewrite the folder again"]
    problems = []
    from ..errors import RewriteError
    from ..modelio.graph import _check_external

    for t in graph.initializer:  # external data the runtime (and our runner) will read: there, whole, inside
        if t.data_location == onnx.TensorProto.EXTERNAL:
            try:
                _check_external(t, out)
            except RewriteError as exc:
                problems.append(f"{path}: {str(exc).replace('re-export the model', 'rewrite the folder again')}")
                break
    said = lambda key: f"config.json {key} is {sizes[key]}"  # noqa: E731
    inputs = {i.name: i for i in graph.input}
    caches = [i for n, i in inputs.items() if n.startswith("past_key_values_")]
    plugins = [n for n in graph.node if n.op_type == "AttentionPlugin"]
    if "num_hidden_layers" in sizes and len(plugins) != sizes["num_hidden_layers"]:
        problems.append(f"{path}: {len(plugins)} AttentionPlugin nodes but {said('num_hidden_layers')}")
    if "num_hidden_layers" in sizes and len(caches) != sizes["num_hidden_layers"]:
        problems.append(f"{path}: {len(caches)} past_key_values inputs but {said('num_hidden_layers')}")
    if "inputs_embeds" not in inputs:
        problems.append(f"{path}: no inputs_embeds input; not a folder written by onnx_rewriter")
    elif "hidden_size" in sizes and _dims(inputs["inputs_embeds"])[-1:] not in ([None], [sizes["hidden_size"]]):
        problems.append(f"{path}: inputs_embeds is {_dims(inputs['inputs_embeds'])[-1]} wide but {said('hidden_size')}")
    if target is not None:
        domain = {n.domain for n in plugins}
        if domain and domain != {target.domain}:
            problems.append(f"{path}: AttentionPlugin domain {', '.join(sorted(domain))} is not {target.name}'s "
                            f"'{target.domain}' (config.json edgellm_version {cfg['edgellm_version']})")
    attrs = (("num_q_heads", "num_attention_heads"), ("num_kv_heads", "num_key_value_heads"), ("head_size", "head_dim"))
    per_layer: dict[str, list[str]] = {}  # one line per kind of problem, however many layers have it
    kv = cfg.get("kv_cache_dtype")
    for node in plugins:
        values = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        for attr, key in attrs:
            if key in sizes and values.get(attr) != sizes[key]:
                per_layer.setdefault(f"has {attr}={values.get(attr)} but {said(key)}", []).append(node.name)
        fp8_attr = values.get("enable_fp8_kv_cache", 0)
        if kv in KV_CACHE_DTYPES and bool(fp8_attr) != (kv == "fp8"):
            per_layer.setdefault(f"has enable_fp8_kv_cache={fp8_attr} but config.json kv_cache_dtype is {kv!r}",
                                 []).append(node.name)
    paged = "kv_page_table" in inputs
    for cache in caches:
        elem = cache.type.tensor_type.elem_type
        if kv in KV_CACHE_DTYPES and (elem == FP8) != (kv == "fp8"):
            per_layer.setdefault(f"is {onnx.TensorProto.DataType.Name(elem)} but config.json kv_cache_dtype is "
                                 f"{kv!r}", []).append(cache.name)
        dims = _dims(cache)
        if len(dims) == 5:  # dense [B, 2, Hkv, cap, D], paged [2, pages, 128, Hkv, D]
            for key, got in (("num_key_value_heads", dims[3] if paged else dims[2]), ("head_dim", dims[4])):
                if key in sizes and got is not None and got != sizes[key]:
                    per_layer.setdefault(f"has {got} in its {key} dim but {said(key)}", []).append(cache.name)
    for what, names in per_layer.items():
        more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
        problems.append(f"{path}: {names[0]}{more} {what}")
    problems += _rope_and_vlm(path, cfg, sizes, inputs)
    logits = next((o for o in graph.output if o.name == "logits"), None)
    want = cfg.get("reduced_vocab_size", sizes.get("vocab_size"))
    if logits is None:
        problems.append(f"{path}: no logits output; not a folder written by onnx_rewriter")
    elif want is not None and _dims(logits)[-1:] not in ([None], [want]):
        key = "reduced_vocab_size" if "reduced_vocab_size" in cfg else "vocab_size"
        problems.append(f"{path}: logits has {_dims(logits)[-1]} entries per token but config.json {key} is {want}")
    return problems


def _rope_and_vlm(path: Path, cfg: dict, sizes: dict, inputs: dict) -> list[str]:
    """The RoPE table width the runtime builds from config.json (head_dim · partial_rotary_factor, or twice the
    M-RoPE sections) is the graph's; a VLM decoder's deepstack inputs are config.json's count."""
    problems = []
    table = inputs.get("rope_rotary_cos_sin")
    width = _dims(table)[-1] if table is not None and _dims(table) else None
    scaling = cfg.get("rope_scaling") if isinstance(cfg.get("rope_scaling"), dict) else {}
    section = scaling.get("mrope_section")
    factor = cfg.get("partial_rotary_factor")
    if isinstance(section, list) and all(isinstance(x, int) for x in section):
        want, why = 2 * sum(section), f"rope_scaling.mrope_section {section}"
    elif "head_dim" in sizes and isinstance(factor, (int, float)) and not isinstance(factor, bool):
        want, why = round(sizes["head_dim"] * factor), f"head_dim {sizes['head_dim']} x partial_rotary_factor {factor}"
    else:
        want = None
    if width is not None and want is not None and width != want:
        problems.append(f"{path}: rope_rotary_cos_sin is {width} wide but config.json {why} gives {want}")
    if section is not None:
        deep = sum(1 for n in inputs if n.startswith("deepstack_embeds_"))
        nd = cfg.get("num_deepstack_features")
        if nd != deep:
            problems.append(f"{path}: {deep} deepstack_embeds inputs but config.json num_deepstack_features is {nd!r}")
    return problems


def _embedding(out: Path, sizes: dict) -> list[str]:
    path = out / "embedding.safetensors"
    try:
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            shape = list(f.get_slice("embedding").get_shape())
    except Exception as exc:  # noqa: BLE001
        return [f"{path}: no readable 'embedding' tensor ({type(exc).__name__}); rewrite the folder again"]
    want = [sizes.get("vocab_size"), sizes.get("hidden_size")]
    if len(shape) != 2 or any(w is not None and w != s for w, s in zip(want, shape)):
        return [f"{path}: embedding is {shape} but config.json says [vocab_size, hidden_size] = {want}"]
    return []


def _vocab_map(out: Path, cfg: dict, sizes: dict) -> list[str]:
    from onnx_rewriter.reference.vocab_map import MAP_FILE, load_map

    from ..errors import RewriteError

    path = out / MAP_FILE
    try:
        vmap = load_map(out)
    except (RewriteError, OSError, ValueError) as exc:
        return [f"{path}: {exc}"]
    if vmap is None:
        return [f"{out / 'config.json'}: reduced_vocab_size without {MAP_FILE}"] if "reduced_vocab_size" in cfg else []
    problems = []
    if cfg.get("reduced_vocab_size") != len(vmap):
        problems.append(f"{path}: {len(vmap)} ids but config.json reduced_vocab_size is "
                        f"{cfg.get('reduced_vocab_size')}")
    if len(vmap) and (vmap.min() < 0 or ("vocab_size" in sizes and vmap.max() >= sizes["vocab_size"])):
        problems.append(f"{path}: ids outside [0, vocab_size {sizes.get('vocab_size')})")
    return problems


def _model(out: Path, cfg: dict, sizes: dict, model: str, vlm: bool | None) -> list[str]:
    """The folder and --model describe the same model (sizes; text vs vision-language)."""
    problems = []
    folder_vlm = isinstance(cfg.get("rope_scaling"), dict) and "mrope_section" in cfg["rope_scaling"]
    if vlm is not None and vlm != folder_vlm:
        what = ("a vision-language model" if vlm else "a text model", "a VLM decoder (M-RoPE)" if folder_vlm
                else "a text LLM")
        problems.append(f"{out / 'config.json'}: the folder is {what[1]} but --model '{model}' is {what[0]}; "
                        f"verify against the checkpoint the folder was exported from")
    path = Path(model) / "config.json"
    try:
        hf = read_config(path)
    except RewriteError:
        return problems  # a hub id, or no config: loading the model says what is wrong
    from ..sidefiles.config_json import _get, _llm_part

    hf = _llm_part(hf)
    differ = []
    for key in MODEL_KEYS:
        theirs = _get(hf, key)
        if key == "num_key_value_heads" and theirs is None:
            theirs = _get(hf, "num_attention_heads")
        if key in sizes and isinstance(theirs, int) and theirs != sizes[key]:
            differ.append((key, sizes[key], theirs))
    if differ:
        problems.append(f"{out / 'config.json'}: {', '.join(f'{k}={a}' for k, a, _ in differ)} but --model's {path} "
                        f"says {', '.join(f'{k}={b}' for k, _, b in differ)}; verify against the checkpoint the "
                        f"folder was exported from")
    return problems


def check_consistency(out_dir, model, vlm, extra: list[str] = ()) -> VerifyResult | None:
    """The folder's files against each other, the contract and `model` (consistency.py): a FAILED result
    (one `FAIL:` line per problem, printed even with -q) or None when they agree."""
    problems = list(extra) + check(out_dir, model, vlm=vlm)
    if not problems:
        return None
    result = VerifyResult(criterion="the folder's files agree with each other, the contract and the model; "
                                    "no numbers were run", problems=problems)
    for line in problems:
        print(f"FAIL: {line}", file=sys.stdout)
    print(f"verify FAILED ({result.criterion})", file=sys.stdout)
    return result
