"""Weight+activation quantized HF checkpoints: which format a folder holds, and its linears' tensors decoded.

`detect(folder)` reads the signals in NVIDIA's order (contract part 3, section 16.7) and returns a `Format`:

1. `hf_quant_config.json` `quantization.quant_algo` (ModelOpt's own file);
2. else `config.json` `quantization_config` with a `quant_algo` (ModelOpt's HF form, `quant_method: modelopt`);
3. else `quantization_config.quant_method`: awq / gptq (INT4, features/int4/checkpoint.py), fp8 with
   `weight_block_size` (block-FP8, DeepSeek / Qwen "-FP8"), compressed-tensors, anything else;
4. else, unlike NVIDIA (which reads such a folder as fp16), the safetensors headers: a linear stored with a
   `weight_scale` / `weight_scale_inv` / `input_scale`, or a weight in F8_E4M3 / U8 / I8, is a quantized
   checkpoint with no recognised configuration and is refused, never read as fp16.

`Format.scheme`: "int4" (AWQ, GPTQ, ModelOpt W4A16_AWQ: the INT4 route), "fp8", "nvfp4", "w4a16_nvfp4",
"int8_sq", "mxfp8", "mixed" (MIXED_PRECISION: `layers` maps a module to its scheme), "block_fp8",
"compressed_tensors", "unknown". `Format.name` is how a one-line message names it. Which schemes a route
accepts is the route's decision (`Format.refuse_unless`).

`Checkpoint(folder, fmt)` reads each quantized linear's tensors (raw bytes from the safetensors files, any
dtype, F8_E4M3 included) into a `QuantLinear` whose `dequantized()` is the exact fp32 weight [N, K]
(reference/wa_codecs.py does the arithmetic).
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import RewriteError
from ..modelio.config_file import read_config
from ..modelio.safetensors_header import TensorIndex, read_header
from ..reference import wa_codecs

HF_QUANT_CONFIG = "hf_quant_config.json"
BLOCK_FP8 = 128  # weight_scale_inv covers 128 x 128 blocks

SCHEME_NAMES = {
    "fp8": "FP8 W8A8 per tensor", "nvfp4": "NVFP4 W4A4", "w4a16_nvfp4": "NVFP4 weight-only (W4A16_NVFP4)",
    "int8_sq": "INT8 SmoothQuant W8A8", "mxfp8": "MXFP8", "mixed": "MIXED_PRECISION", "int4": "INT4",
    "block_fp8": "block-FP8 (weight_scale_inv, 128x128)", "compressed_tensors": "compressed-tensors",
    "unknown": "unrecognised quantization",
}

# What each scheme stores per linear: suffix -> (safetensors dtypes allowed, rank of the shape or None)
TENSORS = {
    "fp8": {"weight": ("F8_E4M3",), "weight_scale": ("F32", "F16", "BF16"), "input_scale": ("F32", "F16", "BF16")},
    "nvfp4": {"weight": ("U8",), "weight_scale": ("F8_E4M3",), "weight_scale_2": ("F32",), "input_scale": ("F32",)},
    "w4a16_nvfp4": {"weight": ("U8",), "weight_scale": ("F8_E4M3",), "weight_scale_2": ("F32",)},
    "int8_sq": {"weight": ("I8",), "weight_scale": ("F32",), "input_scale": ("F32",),
                "pre_quant_scale": ("F16", "F32", "BF16")},
    "mxfp8": {"weight": ("F8_E4M3",), "weight_scale": ("U8",)},
    "block_fp8": {"weight": ("F8_E4M3",), "weight_scale_inv": ("F32", "BF16", "F16")},
}
OPTIONAL = {"int8_sq": ("pre_quant_scale",)}
_QUANT_DTYPES = ("F8_E4M3", "F8_E5M2", "U8", "I8", "F4", "F8_E8M0")
_SCALE_SUFFIXES = (".weight_scale", ".weight_scale_inv", ".input_scale", ".weight_scale_2", ".qweight",
                   ".weight_packed")


def scheme_of(algo: str) -> str:
    """A ModelOpt quant_algo string -> scheme (NVIDIA's substring rules, most specific first)."""
    a = str(algo).upper()
    if a == "MIXED_PRECISION":
        return "mixed"
    if "W4A16" in a and "AWQ" in a:
        return "int4"
    if "W4A16_NVFP4" in a or ("NVFP4" in a and "A16" in a):
        return "w4a16_nvfp4"
    if "MXFP8" in a or "FP8_PB" in a:
        return "mxfp8"
    if "NVFP4" in a or "FP4" in a:
        return "nvfp4"
    if "W4A8" in a or "W4A16" in a:
        return "unknown"
    if "FP8" in a:
        return "fp8"
    if "W8A8" in a or "INT8" in a:
        return "int8_sq"
    return "unknown"


@dataclass(frozen=True)
class Format:
    scheme: str
    name: str  # e.g. "ModelOpt FP8 (hf_quant_config.json quant_algo 'FP8')"
    config: dict = field(default_factory=dict)  # the quantization section read
    exclude: tuple = ()  # glob patterns of modules left unquantized
    layers: dict = field(default_factory=dict)  # MIXED_PRECISION: module -> scheme
    kv_cache: str | None = None  # kv_cache_quant_algo as written (NVIDIA ignores it: k_scale tensors decide)

    def refuse_unless(self, supported, route: str, fix: str = "") -> None:
        """RewriteError (one line, naming the format) unless this scheme is in `supported`."""
        if self.scheme not in supported:
            raise RewriteError(f"{route}: {self.name} is not supported"
                               + (f"; {fix}" if fix else "") + " (docs/support.md, 'Quantized checkpoints')")

    def excluded(self, module: str) -> bool:
        return any(fnmatch.fnmatchcase(module, p) for p in self.exclude)

    def scheme_for(self, module: str) -> str | None:
        """The scheme of one linear (None: left fp16)."""
        if self.excluded(module):
            return None
        if self.scheme == "mixed":
            return self.layers.get(module)
        return self.scheme


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise RewriteError(f"cannot read '{path}' ({str(exc).splitlines()[0][:80]}); download it again") from None
    if not isinstance(data, dict):
        raise RewriteError(f"'{path}' is not a JSON object; download it again")
    return data


def _globs(value) -> tuple:
    return tuple(str(v) for v in value) if isinstance(value, (list, tuple)) else ()


def _modelopt(section: dict, where: str) -> Format:
    algo = str(section.get("quant_algo", ""))
    scheme = scheme_of(algo)
    layers = {}
    if scheme == "mixed":
        ql = section.get("quantized_layers")
        if not isinstance(ql, dict):
            raise RewriteError(f"{where}: MIXED_PRECISION without a quantized_layers object; the checkpoint is "
                               f"incomplete")
        layers = {str(k): scheme_of(v.get("quant_algo", "") if isinstance(v, dict) else v) for k, v in ql.items()}
    kv = section.get("kv_cache_quant_algo")
    return Format(scheme, f"ModelOpt {algo or '(no quant_algo)'} checkpoint ({where})", dict(section),
                  _globs(section.get("exclude_modules", section.get("ignore"))), layers,
                  None if kv is None else str(kv))


def detect(folder) -> Format | None:
    """The quantization format of checkpoint `folder` (None: not quantized). Never raises for a format it
    recognises, whatever the format; RewriteError only for unreadable files."""
    folder = Path(folder)
    hqc = folder / HF_QUANT_CONFIG
    if hqc.is_file():
        section = _read_json(hqc).get("quantization")
        if isinstance(section, dict) and section.get("quant_algo"):
            return _modelopt(section, f"{HF_QUANT_CONFIG} quant_algo '{section['quant_algo']}'")
    config = read_config(folder / "config.json") if (folder / "config.json").is_file() else {}
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(qc, dict):
        if qc.get("quant_algo"):
            return _modelopt(qc, f"config.json quantization_config quant_algo '{qc['quant_algo']}'")
        method = str(qc.get("quant_method", "")).lower()
        if method in ("awq", "gptq"):
            return Format("int4", f"{method.upper()} checkpoint", dict(qc))
        if method == "fp8" and qc.get("weight_block_size") is not None:
            block = list(qc.get("weight_block_size") or [])
            name = f"block-FP8 checkpoint (quant_method fp8, weight_block_size {block})"
            if block != [BLOCK_FP8, BLOCK_FP8]:
                return Format("unknown", name, dict(qc))
            return Format("block_fp8", name, dict(qc), _globs(qc.get("modules_to_not_convert")))
        if method in ("compressed-tensors", "compressed_tensors"):
            return Format("compressed_tensors", f"compressed-tensors checkpoint (format '{qc.get('format', '?')}')",
                          dict(qc), _globs(qc.get("ignore")))
        return Format("unknown", f"quantized checkpoint (quant_method '{method or '?'}')", dict(qc))
    return _from_tensors(folder)


def _from_tensors(folder: Path) -> Format | None:
    """A quantized checkpoint that names no configuration: told by its tensors' names and dtypes."""
    for f in sorted(folder.glob("*.safetensors")):
        try:
            tensors = read_header(f).tensors
        except (OSError, ValueError):
            continue  # the checkpoint check names a broken file
        for name, info in sorted(tensors.items()):
            if name.endswith(_SCALE_SUFFIXES) or (name.endswith(".weight") and info.get("dtype") in _QUANT_DTYPES):
                return Format("unknown", f"quantized checkpoint without a quantization config ('{f.name}' holds "
                                         f"{name} {info.get('dtype')}; no hf_quant_config.json or "
                                         f"quantization_config)")
    return None


# ----------------------------------------------------------------------------------------------- tensors

_NP = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "U8": np.uint8, "F8_E4M3": np.uint8,
       "I32": np.int32, "I64": np.int64}


@dataclass
class QuantLinear:
    """One quantized linear's stored tensors (E4M3 as uint8 codes) and its weight, exactly."""

    module: str
    scheme: str
    tensors: dict  # suffix -> numpy array (bf16 scales as fp32)

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K)."""
        w = self.tensors["weight"]
        return (w.shape[0], w.shape[1] * 2) if self.scheme in ("nvfp4", "w4a16_nvfp4") else tuple(w.shape)

    def dequantized(self, dtype=np.float32) -> np.ndarray:
        """The weight [N, K] the stored codes and scales mean (scales as stored), computed in float64 and
        rounded once to `dtype`. INT8-SQ: the weight applied to x * pre_quant_scale (`effective` undoes it)."""
        t, s = self.tensors, self.scheme
        f64 = np.float64
        if s == "fp8":
            w = wa_codecs.e4m3_decode(t["weight"]).astype(f64) * f64(t["weight_scale"].reshape(()))
        elif s in ("nvfp4", "w4a16_nvfp4"):
            step = wa_codecs.e4m3_decode(t["weight_scale"]).astype(f64) * f64(t["weight_scale_2"].reshape(-1)[0])
            w = wa_codecs.e2m1_decode(wa_codecs.unpack_fp4(t["weight"])).astype(f64) * np.repeat(
                step, wa_codecs.FP4_BLOCK, axis=-1)
        elif s == "int8_sq":
            w = t["weight"].astype(f64) * t["weight_scale"].astype(f64).reshape(-1, 1)
        elif s == "mxfp8":
            w = wa_codecs.e4m3_decode(t["weight"]).astype(f64) * np.repeat(
                np.exp2(t["weight_scale"].astype(f64) - 127), 32, axis=-1)
        elif s == "block_fp8":
            n, k = t["weight"].shape
            inv = t["weight_scale_inv"].astype(f64)
            per = np.repeat(np.repeat(inv, BLOCK_FP8, axis=0)[:n], BLOCK_FP8, axis=1)[:, :k]
            w = wa_codecs.e4m3_decode(t["weight"]).astype(f64) * per
        else:
            raise RewriteError(f"{self.module}: no decoder for {SCHEME_NAMES.get(s, s)}")
        return w.astype(dtype)

    def fp16_weight(self) -> np.ndarray:
        """The fp16 weight [N, K] an fp16 graph computes from this linear: FP8 DequantizeLinear(W, fp16(weight_scale))
        (the scale cast to fp16 first, contract part 3 16.3, one rounding of the product); block-FP8
        fp16(fp8 * weight_scale_inv)."""
        if self.scheme == "fp8":
            s = np.float16(self.tensors["weight_scale"].reshape(()))
            return (wa_codecs.e4m3_decode(self.tensors["weight"]).astype(np.float64) * np.float64(s)).astype(np.float16)
        if self.scheme in ("block_fp8", "mxfp8"):  # MXFP8: fp16 out of TRT_MXFP8DequantizeLinear, rounded once
            return self.dequantized(np.float16)
        if self.scheme == "int8_sq":  # Cast(DequantizeLinear(W, s_w fp32, axis=0), fp16): fp32 product, then fp16
            return self.dequantized(np.float32).astype(np.float16)
        if self.scheme in ("nvfp4", "w4a16_nvfp4"):  # Cast(DequantizeLinear(W, DequantizeLinear(s_blk, s_g)), fp16)
            step = (wa_codecs.e4m3_decode(self.tensors["weight_scale"]).astype(np.float64)
                    * np.float64(np.float32(self.tensors["weight_scale_2"].reshape(-1)[0]))).astype(np.float32)
            codes = wa_codecs.e2m1_decode(wa_codecs.unpack_fp4(self.tensors["weight"])).astype(np.float64)
            w = codes * np.repeat(step, wa_codecs.FP4_BLOCK, axis=-1).astype(np.float64)
            return w.astype(np.float32).astype(np.float16)
        raise RewriteError(f"{self.module}: {SCHEME_NAMES.get(self.scheme, self.scheme)} has no fp16 weight here")

    def traced_weight(self) -> np.ndarray:
        """The fp16 weight [N, K] the exported model holds for this linear: fp16_weight, times pre_quant_scale per
        input channel for INT8-SQ (the graph multiplies the input instead), rounded once."""
        w = self.fp16_weight()
        pqs = self.tensors.get("pre_quant_scale")
        if self.scheme != "int8_sq" or pqs is None:
            return w
        return (w.astype(np.float64) * pqs.astype(np.float64).reshape(1, -1)).astype(np.float16)

    def effective(self, dtype=np.float32) -> np.ndarray:
        """The weight on the linear's own input: dequantized, times pre_quant_scale per input channel (INT8-SQ)."""
        w = self.dequantized(np.float64)
        pqs = self.tensors.get("pre_quant_scale")
        return (w if pqs is None else w * pqs.astype(np.float64).reshape(1, -1)).astype(dtype)


def _expected_shapes(scheme: str, n: int, k: int) -> dict:
    if scheme == "fp8":
        return {"weight": [(n, k)], "weight_scale": [(), (1,)], "input_scale": [(), (1,)]}
    if scheme in ("nvfp4", "w4a16_nvfp4"):
        return {"weight": [(n, k // 2)], "weight_scale": [(n, k // 16)], "weight_scale_2": [(), (1,)],
                "input_scale": [(), (1,)]}
    if scheme == "int8_sq":
        return {"weight": [(n, k)], "weight_scale": [(n,), (n, 1)], "input_scale": [(), (1,)],
                "pre_quant_scale": [(k,)]}
    if scheme == "mxfp8":
        return {"weight": [(n, k)], "weight_scale": [(n, k // 32)]}
    if scheme == "block_fp8":
        return {"weight": [(n, k)], "weight_scale_inv": [(-(-n // BLOCK_FP8), -(-k // BLOCK_FP8))]}
    return {}


class Checkpoint:
    """The quantized linears of a checkpoint folder in format `fmt` (read lazily from the safetensors)."""

    def __init__(self, folder, fmt: Format):
        self.folder, self.format = Path(folder), fmt
        self._index = TensorIndex(self.folder)
        self._entries = self._index.entries
        marker = ".weight_scale_inv" if fmt.scheme == "block_fp8" else ".weight_scale"
        prefixes = sorted(k[: -len(marker)] for k in self._entries if k.endswith(marker))
        self.linears = {p: fmt.scheme_for(p) for p in prefixes}
        stray = [p for p, s in self.linears.items() if s is None]
        if stray:
            raise RewriteError(f"{fmt.name}: {stray[0]} stores scales but is excluded from quantization "
                               f"(exclude_modules / not in quantized_layers); the checkpoint contradicts its config")

    def names(self) -> list[str]:
        return list(self._entries)

    def tensor(self, name: str) -> np.ndarray:
        e = self._entries[name]
        if e.dtype != "BF16" and e.dtype not in _NP:
            raise RewriteError(f"'{e.file.name}': {name} has dtype {e.dtype}, which onnx_rewriter does not read")
        raw = self._index.raw(name)
        if e.dtype == "BF16":
            return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(e.shape)
        return raw.view(_NP[e.dtype]).reshape(e.shape)

    def linear(self, module: str) -> QuantLinear:
        """One linear's tensors, checked against the scheme's table (dtypes, shapes): RewriteError naming
        the tensor when they do not fit."""
        scheme = self.linears[module]
        spec = TENSORS.get(scheme)
        if spec is None:
            raise RewriteError(f"{self.format.name}: {module} is {SCHEME_NAMES.get(scheme, scheme)}, which has no "
                               f"tensor reader")
        tensors, dtypes = {}, {}
        for suffix, allowed in spec.items():
            name = f"{module}.{suffix}"
            if name not in self._entries:
                if suffix in OPTIONAL.get(scheme, ()):
                    continue
                raise RewriteError(f"{self.format.name}: {name} is missing ({SCHEME_NAMES[scheme]} stores "
                                   f"{', '.join(spec)} per linear)")
            dtype = self._entries[name].dtype
            if dtype not in allowed:
                raise RewriteError(f"{self.format.name}: {name} is {dtype}, expected {' or '.join(allowed)}")
            tensors[suffix], dtypes[suffix] = self.tensor(name), dtype
        n, k = tensors["weight"].shape
        if scheme in ("nvfp4", "w4a16_nvfp4"):
            k *= 2
        for suffix, shapes in _expected_shapes(scheme, n, k).items():
            if suffix in tensors and tuple(tensors[suffix].shape) not in shapes:
                raise RewriteError(f"{self.format.name}: {module}.{suffix} has shape {list(tensors[suffix].shape)}, "
                                   f"expected {list(shapes[0])} for weight {list(tensors['weight'].shape)}")
        return QuantLinear(module, scheme, tensors)

    def plain(self) -> dict:
        """Every tensor that is not part of a quantized linear (a bias stays), by name."""
        own = tuple(f"{p}." for p in self.linears)
        return {k: self.tensor(k) for k in self._entries
                if not (k.startswith(own) and not k.endswith(".bias"))}

    def kv_scales(self) -> dict:
        """(layer, "k" | "v") -> fp32 scale, from `*.k_proj.k_scale` / `*.v_proj.v_scale` tensors."""
        out = {}
        for name in self._entries:
            m = re.search(r"layers\.(\d+)\.self_attn\.([kv])_proj\.([kv])_scale$", name)
            if m and m.group(2) == m.group(3) and "visual" not in name:
                out[(int(m.group(1)), m.group(2))] = float(self.tensor(name).reshape(-1)[0])
        return out
