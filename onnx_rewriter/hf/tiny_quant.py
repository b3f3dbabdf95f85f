"""Tiny quantized checkpoints in the forms of contract part 3, section 16.7, from a plain tiny checkpoint.

No ModelOpt, no GPU, no torch: the decoder linears (q/k/v/o, gate/up/down) of a plain checkpoint folder
(onnx_rewriter.hf.tiny) are quantized with reference/wa_codecs.py and written as the named form stores them;
the other tensors, config.json and the tokenizer are copied. lm_head stays fp (ModelOpt's default
`exclude_modules`). Same arguments, same bytes.

Forms (`FORMS`): fp8, nvfp4, w4a16_nvfp4, int8_sq, mxfp8, mixed (MIXED_PRECISION quantized_layers: by default
layer 0 FP8, the others NVFP4; `mixed=[(glob, form), ...]` picks each linear's form, first match), block_fp8
(`weight_scale_inv` 128x128, `quant_method: fp8`),
compressed_tensors (the config only; FP8 tensors in ModelOpt's names). `signal`: where the ModelOpt forms
say what they are: "hf_quant_config" (hf_quant_config.json only), "config" (config.json
`quantization_config` only), "both" (as recent ModelOpt exports), "none" (quantized tensors, no config).

Activation scales: `input_amax` (one value for every linear) stands for the amax a calibration would have
found, or `calibrated_amax(src)` measures each linear's (`--calibrate`: transformers on the bundled prompts);
input_scale = input_amax / 448 (FP8), / (6 * 448) (NVFP4), / 127 (INT8).
`kv_scales`: (k_scale, v_scale) written as `k_proj.k_scale` / `v_proj.v_scale` for every layer (FP8 forms).
`exclude`: globs of decoder linears kept fp16 (a plain `.weight`) and listed in `exclude_modules` beside lm_head.

    python -m onnx_rewriter.hf.tiny_quant FORM SRC DST [--signal S] [--input-amax A | --calibrate] [--kv-scales K V]
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np

from ..features.wa_checkpoint import BLOCK_FP8, HF_QUANT_CONFIG
from ..modelio.config_file import read_config
from ..modelio.safetensors_header import read_header
from ..reference import wa_codecs as C

FORMS = ("fp8", "nvfp4", "w4a16_nvfp4", "int8_sq", "mxfp8", "mixed", "block_fp8", "compressed_tensors")
ALGO = {"fp8": "FP8", "nvfp4": "NVFP4", "w4a16_nvfp4": "W4A16_NVFP4", "int8_sq": "W8A8_SQ_PER_CHANNEL",
        "mxfp8": "MXFP8", "mixed": "MIXED_PRECISION"}
SIGNALS = ("hf_quant_config", "config", "both", "none")
MIXED = (("*.layers.0.*", "fp8"), ("*", "nvfp4"))  # the mixed form's default: (module glob, form), first match
_LINEAR = re.compile(r"^(.*\.layers\.(\d+)\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj))\.weight$")
_DTYPE_OUT = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int8): "I8",
              np.dtype(np.uint8): "U8"}


def read_tensors(folder) -> dict:
    """Every tensor of the folder's safetensors files as numpy (bf16 as fp32)."""
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        header = read_header(f)
        for name, info in header.tensors.items():
            start, end = info["data_offsets"]
            raw = np.fromfile(f, dtype=np.uint8, count=end - start, offset=header.data_start + start)
            dt = info["dtype"]
            arr = ((raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32) if dt == "BF16"
                   else raw.view({"F32": np.float32, "F16": np.float16, "I64": np.int64}[dt]))
            out[name] = arr.reshape(info["shape"])
    return out


def save_safetensors(path, tensors: dict) -> None:
    """Write `tensors` (name -> array, or (safetensors dtype, array) for E4M3 codes held as uint8)."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        value = tensors[name]
        dtype, arr = value if isinstance(value, tuple) else (_DTYPE_OUT[np.asarray(value).dtype], value)
        data = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(np.shape(arr)), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text)
        for b in blobs:
            fh.write(b)


def _e4m3(arr):
    return ("F8_E4M3", arr)


def quantize_linear(form: str, w: np.ndarray, input_amax: float, rng, pqs=None) -> dict:
    """The stored tensors (suffix -> array) of one linear's weight w [N, K] fp32 in `form` (INT8-SQ: `pqs`, the
    pre_quant_scale [K] linears reading one input share, drawn here when None)."""
    w = np.asarray(w, np.float32)
    n, k = w.shape
    if form in ("fp8", "compressed_tensors"):
        s = np.float32(np.abs(w).max() / C.E4M3_MAX)
        return {"weight": _e4m3(C.e4m3_encode(w / s)), "weight_scale": np.array(s, np.float32),
                "input_scale": np.array(input_amax / C.E4M3_MAX, np.float32)}
    if form in ("nvfp4", "w4a16_nvfp4"):
        packed, sblk, s_g = C.nvfp4_quantize_weight(w)
        out = {"weight": packed, "weight_scale": _e4m3(sblk), "weight_scale_2": np.array(s_g, np.float32)}
        if form == "nvfp4":
            out["input_scale"] = np.array(input_amax / (C.E2M1_MAX * C.E4M3_MAX), np.float32)
        return out
    if form == "int8_sq":  # x' = x * pqs, W' = W / pqs: x' W'^T = x W^T; per-channel int8 W'
        if pqs is None:
            pqs = np.exp2(rng.integers(-1, 2, k)).astype(np.float16)  # powers of two: exact in fp16 and fp32
        wp = w / pqs.astype(np.float32)
        s = (np.abs(wp).max(axis=1) / 127).astype(np.float32)
        return {"weight": C.int8_quantize(wp, s[:, None]), "weight_scale": s, "pre_quant_scale": pqs,
                "input_scale": np.array(input_amax * float(pqs.max()) / 127, np.float32)}  # amax of x * pqs
    if form == "mxfp8":
        codes, scale = C.mxfp8_quantize(w)
        return {"weight": _e4m3(codes), "weight_scale": scale}
    if form == "block_fp8":
        bn, bk = -(-n // BLOCK_FP8), -(-k // BLOCK_FP8)
        pad = np.zeros((bn * BLOCK_FP8, bk * BLOCK_FP8), np.float32)
        pad[:n, :k] = np.abs(w)
        inv = (pad.reshape(bn, BLOCK_FP8, bk, BLOCK_FP8).max(axis=(1, 3)) / C.E4M3_MAX).astype(np.float32)
        inv = np.where(inv > 0, inv, np.float32(1.0))
        per = np.repeat(np.repeat(inv, BLOCK_FP8, axis=0)[:n], BLOCK_FP8, axis=1)[:, :k]
        return {"weight": _e4m3(C.e4m3_encode(w / per)), "weight_scale_inv": inv}
    raise ValueError(f"unknown form {form!r}; known: {', '.join(FORMS)}")


def calibrated_amax(src, prompts=None) -> dict:
    """{module: max |input|} of every decoder linear of the plain checkpoint `src` over `prompts` (default: the
    calibration prompts bundled in features/calibration.py), run in transformers (fp32): what ModelOpt's
    calibration measures for a per-tensor activation scale."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..features.calibration import DEFAULT_PROMPTS, MAX_TOKENS

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(src))
    amax: dict = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and _LINEAR.match(f"{name}.weight"):
            m.register_forward_pre_hook(lambda module, args, name=name: amax.__setitem__(
                name, max(amax.get(name, 0.0), float(args[0].abs().max()))))
    with torch.no_grad():
        for p in prompts or DEFAULT_PROMPTS:
            ids = tok(p, return_tensors="pt")["input_ids"][:, :MAX_TOKENS]
            model(input_ids=ids)
    return amax


def write(form: str, src, dst, signal: str = "both", input_amax: float | dict = 4.0, kv_scales=None,
          seed: int = 0, mixed=MIXED, exclude=()) -> Path:
    """Write `src` (a plain checkpoint folder) quantized in `form` into `dst`. Returns dst. `input_amax`: one
    value for every linear, or {module: amax} (calibrated_amax)."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; known: {', '.join(FORMS)}")
    if signal not in SIGNALS:
        raise ValueError(f"unknown signal {signal!r}; known: {', '.join(SIGNALS)}")
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copyfile(f, dst / f.name)
    rng = np.random.default_rng(seed)
    out, layers, shared = {}, {}, {}
    for name, arr in read_tensors(src).items():
        m = _LINEAR.match(name)
        if not m:
            out[name] = arr.astype(np.float16) if arr.dtype == np.float32 else arr
            continue
        module = m.group(1)
        if any(fnmatch.fnmatchcase(module, p) for p in exclude):  # left fp16, as ModelOpt stores it
            out[name] = arr.astype(np.float16)
            continue
        lform = next(f for p, f in mixed if fnmatch.fnmatchcase(module, p)) if form == "mixed" else form
        layers[module] = ALGO.get(lform, lform)
        amax = input_amax.get(module, 0.0) if isinstance(input_amax, dict) else input_amax
        # q/k/v and gate/up read one input: one pre_quant_scale each (as ModelOpt's SmoothQuant stores them)
        group = re.sub(r"\.mlp\.(?:gate|up)_proj$", ".mlp_in", re.sub(r"\.self_attn\.[qkv]_proj$", ".attn_in", module))
        if lform == "int8_sq" and group not in shared:
            shared[group] = np.exp2(rng.integers(-1, 2, arr.shape[1])).astype(np.float16)
        for suffix, value in quantize_linear(lform, arr, amax or 1.0, rng, shared.get(group)).items():
            out[f"{module}.{suffix}"] = value
        if kv_scales is not None and lform in ("fp8", "nvfp4") and module.endswith(("k_proj", "v_proj")):
            kv = module[-6]
            out[f"{module}.{kv}_scale"] = np.array(kv_scales[0 if kv == "k" else 1], np.float32)
    save_safetensors(dst / "model.safetensors", out)
    _write_config(form, dst, signal, layers, kv_scales is not None, list(exclude))
    return dst


def _write_config(form: str, dst: Path, signal: str, layers: dict, kv: bool, exclude: list) -> None:
    config = read_config(dst / "config.json")
    config["dtype"] = "float16"
    config.pop("torch_dtype", None)
    if form == "block_fp8":
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [BLOCK_FP8, BLOCK_FP8]}
    elif form == "compressed_tensors":
        config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized",
                                         "ignore": ["lm_head"], "config_groups": {"group_0": {
                                             "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float"}}}}
    else:
        section = {"quant_algo": ALGO[form], "kv_cache_quant_algo": "FP8" if kv else None,
                   "exclude_modules": ["lm_head", *exclude]}
        if form in ("nvfp4", "w4a16_nvfp4"):
            section["group_size"] = 16
        if form == "mixed":
            section["quantized_layers"] = {m: {"quant_algo": a, **({"group_size": 16} if "FP4" in a else {})}
                                           for m, a in sorted(layers.items())}
        if signal in ("hf_quant_config", "both"):
            (dst / HF_QUANT_CONFIG).write_text(json.dumps(
                {"producer": {"name": "modelopt", "version": "0.37.0"}, "quantization": section}, indent=2))
        if signal in ("config", "both"):
            config["quantization_config"] = {"quant_method": "modelopt", **section}
    (dst / "config.json").write_text(json.dumps(config, indent=2))


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m onnx_rewriter.hf.tiny_quant",
                                description="Write a tiny plain checkpoint's decoder linears in a quantized form.")
    p.add_argument("form", choices=FORMS)
    p.add_argument("src", help="a plain checkpoint folder (python -m onnx_rewriter.hf.tiny FAMILY DIR)")
    p.add_argument("dst", help="the folder to write")
    p.add_argument("--signal", default="both", choices=SIGNALS, help="where the form is declared (default both)")
    p.add_argument("--input-amax", type=float, default=4.0, help="the activation amax the scales stand for")
    p.add_argument("--calibrate", action="store_true", help="measure each linear's input amax instead, running "
                   "the plain model (transformers) on the bundled calibration prompts")
    p.add_argument("--kv-scales", type=float, nargs=2, metavar=("K", "V"), help="write k_scale / v_scale tensors")
    args = p.parse_args(argv)
    amax = calibrated_amax(args.src) if args.calibrate else args.input_amax
    print(write(args.form, args.src, args.dst, args.signal, amax, args.kv_scales))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
