"""`--quantize fp8 | nvfp4 | int8-sq` from an fp16 model (`rewrite` and `export`): calibration, then per linear
exactly the tensors a ModelOpt checkpoint would hold (weight codes, weight_scale, input_scale, weight_scale_2,
pre_quant_scale), emitted by features/wa_quant.py's own Q/DQ code (`Calibrated` is a `WaQuant` whose linears
come from here instead of a checkpoint folder). Contract part 3, sections 16.3-16.5.

Calibration (features/calibration.py: the bundled prompts or `--calibration FILE`, through the baseline in
onnxruntime): per linear input, the amax of every channel over all calibration tokens; per-tensor input scales
are amax / 448 (FP8), amax / (6 * 448) (NVFP4's global input scale), max_k(amax_k * pre_quant_scale_k) / 127
(INT8-SQ). Weights (the fp16 model's, as the graph holds them):

- FP8: weight_scale = amax(W) / 448, rounded up to an fp16 value (the graph's scale is fp16, 16.3: codes and
  dequantization then use the same number, and nothing saturates); input_scale likewise fp16-exact.
- NVFP4: wa_codecs.nvfp4_quantize_weight (s_g = amax / (6 * 448), E4M3 block scales, E2M1 codes).
- INT8-SQ: x' = x * p, W' = W / p per input channel (p = pre_quant_scale, fp16, shared by the linears of one
  input: q/k/v, gate/up), per-row int8 W' with weight_scale = rowmax|W'| / 127. SmoothQuant's migration
  s_k = amax_x,k^a / amax_W,k^(1-a) (p = 1 / s, normalised to a geometric mean of 1, |log2| <= 8): `a` is
  searched per input group like the AWQ search (features/int4/awq.py): each candidate's int8 output
  (activation and weight quantized) against x W^T on kept calibration rows; "off" (p = 1, no smoothing) is a
  candidate, so the choice never does worse than no smoothing on the calibration rows.

Streamed: weight statistics and codes are computed from blocks of input channels (rows of the graph's [K, N]
weight) read one at a time; the codes are made when the writer reaches them (graph.computed_constant), one
linear at a time. lm_head stays fp16 unless `--quantize-lm-head`.

verify rebuilds the same weights from the transformers model (`twin_weight`, the same functions) and checks the
graph's weights against the model's own within the scheme's rounding bound (`fidelity`), so a quantizer bug here
cannot hide behind a twin that shares it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from onnx_rewriter.errors import RewriteError, UnsupportedModel
from onnx_rewriter.features import calibration, wa_checkpoint, wa_quant
from onnx_rewriter.features.base import FeatureOptions, check_choice, option, weight_matmuls
from onnx_rewriter.modelio import heap
from onnx_rewriter.modelio.graph import constant_array, constant_row_blocks
from onnx_rewriter.reference import wa_codecs as C

FLAGS = {"fp8": "fp8", "nvfp4": "nvfp4", "int8-sq": "int8_sq"}  # --quantize value -> scheme
ALPHAS = tuple(np.round(np.arange(0.3, 1.01, 0.1), 2))  # SmoothQuant migration strengths tried (plus "off")
MAX_EXP = 8  # |log2 p| <= 8: x * p and W / p stay well inside fp16's range
ROWS = 128  # calibration rows kept per input for the SmoothQuant search
BLOCK_BYTES = 4 << 20  # float64 bytes of one block of input channels the quantizer holds (its temporaries: a few)
STRIP_BYTES = 4 << 20  # fp16 bytes of output rows gathered per pass over a weight (_code_rows)
CODE_BLOCK_BYTES = 256 << 10  # fp32 bytes of the output rows quantized at once (_code_rows; NVFP4 works in float64)


def _fp16_ceil(x: float) -> np.float32:
    """The smallest fp16 value >= x (1 for 0), as fp32: a scale the graph's fp16 copy keeps exactly."""
    if not x > 0:
        return np.float32(1.0)
    h = np.float16(x)
    if float(h) < x:
        h = np.nextafter(h, np.float16(np.inf))
    return np.float32(h)


def input_scale(scheme: str, amax: np.ndarray, pqs: np.ndarray | None = None) -> np.ndarray:
    """The calibrated per-tensor input_scale (fp32 []) from per-channel amax [K]."""
    a = float(np.max(amax)) if amax.size else 0.0
    if scheme == "fp8":
        return np.array(_fp16_ceil(a / C.E4M3_MAX), np.float32)
    if scheme == "nvfp4":
        return np.array(np.float32(a / (C.E2M1_MAX * C.E4M3_MAX)) if a > 0 else 1.0, np.float32)
    if pqs is not None:
        a = float(np.max(amax.astype(np.float64) * pqs.astype(np.float64)))
    return np.array(np.float32(a / 127) if a > 0 else 1.0, np.float32)


def weight_small(scheme: str, amax: float, row_amax: np.ndarray | None = None) -> dict:
    """The per-tensor / per-row weight scales from the fp16 weight's amax (INT8-SQ: of W / p per row)."""
    if scheme == "fp8":
        return {"weight_scale": np.array(_fp16_ceil(amax / C.E4M3_MAX), np.float32)}
    if scheme == "nvfp4":
        return {"weight_scale_2": np.array(np.float32(np.float32(amax) / np.float32(C.E2M1_MAX * C.E4M3_MAX)),
                                           np.float32)}
    s = (np.asarray(row_amax, np.float64) / 127).astype(np.float32)
    return {"weight_scale": np.where(s > 0, s, np.float32(1.0)).astype(np.float32)}


def quantize_block(scheme: str, w_nk: np.ndarray, small: dict, pqs: np.ndarray | None = None) -> dict:
    """The big tensors of a block of input channels: w_nk [N, kb] (fp16 values), kb a multiple of 16."""
    if scheme == "fp8":  # e4m3(fp32(w / s)) as ModelOpt computes it; ml_dtypes' cast: e4m3_encode's codes, 20x faster
        q = np.asarray(w_nk, np.float32) / np.float32(small["weight_scale"])
        return {"weight": np.clip(q, -C.E4M3_MAX, C.E4M3_MAX).astype(wa_quant.E4M3).view(np.uint8)}
    w = np.asarray(w_nk, np.float64)
    if scheme == "nvfp4":
        packed, sblk, _ = C.nvfp4_quantize_weight(w, small["weight_scale_2"])
        return {"weight": packed, "weight_scale": sblk}
    if pqs is not None:
        w = w / pqs.astype(np.float64)[None, :]
    return {"weight": C.int8_quantize(w, small["weight_scale"].astype(np.float64)[:, None])}


def smoothed_row_amax(w_nk: np.ndarray, pqs: np.ndarray | None) -> np.ndarray:
    w = np.abs(np.asarray(w_nk, np.float64))
    return (w if pqs is None else w / pqs.astype(np.float64)[None, :]).max(axis=1)


def twin_weight(scheme: str, w_nk: np.ndarray, pqs: np.ndarray | None = None) -> np.ndarray:
    """The fp16 weight [N, K] the graph's weight DequantizeLinear computes for a model weight w_nk (fp16), made
    by the same functions as the folder's codes (verify's twin; INT8-SQ: the weight applied to x * p)."""
    w = np.asarray(w_nk, np.float16)
    amax = float(np.abs(w.astype(np.float32)).max()) if w.size else 0.0
    small = weight_small(scheme, amax, smoothed_row_amax(w, pqs) if scheme == "int8_sq" else None)
    big = quantize_block(scheme, w, small, pqs)
    tensors = {**small, **big, "input_scale": np.array(1.0, np.float32)}
    if pqs is not None:
        tensors["pre_quant_scale"] = np.asarray(pqs, np.float16)
    return wa_checkpoint.QuantLinear("", scheme, tensors).fp16_weight()


def fidelity(scheme: str, graph_w: np.ndarray, w_scale, model_w: np.ndarray, pqs=None) -> int:
    """How many values of the graph's dequantized weight [N, K] lie further from the model's own fp16 weight than
    the scheme's rounding allows (0 = faithful): FP8 half an E4M3 step (2^-4 relative, 2^-10 s subnormal),
    NVFP4 one block step (half the widest E2M1 gap; the block scale's E4M3 rounding saturates at most 6/16 of a
    step more), INT8-SQ half a row step of W / p; each plus the fp16 rounding of the dequantized value."""
    g = np.asarray(graph_w, np.float64)
    w = np.asarray(model_w, np.float64)
    s = np.asarray(w_scale, np.float64)
    if scheme == "fp8":
        bound = np.maximum(np.abs(w) * 2.0 ** -4, 2.0 ** -10 * s)
    elif scheme == "nvfp4":
        bound = np.repeat(s, C.FP4_BLOCK, axis=-1)
    else:
        if pqs is not None:
            w = w / np.asarray(pqs, np.float64)[None, :]
        bound = 0.5 * s.reshape(-1, 1)
    bound = bound * (1 + 2.0 ** -10) + np.abs(g) * 2.0 ** -11
    return int((np.abs(g - w) > bound).sum())


# ---------------------------------------------------------------------- calibration


@dataclass
class InputStats:
    amax: np.ndarray  # [K] max |x| per input channel over the calibration tokens
    rows: np.ndarray  # [m, K] rows kept for the SmoothQuant search (none unless asked)


def input_stats(run, path, names: list[str], keep_rows: bool) -> tuple[dict, int]:
    """({input tensor name: InputStats}, tokens) over the calibration prompts, the baseline run lean
    (calibration.Baseline: big MatMuls in numpy from streamed weights, the rest in onnxruntime)."""
    rows = calibration.token_rows(run, calibration.prompts(path))
    count = sum(map(len, rows))
    pick = np.linspace(0, count - 1, min(ROWS, count)).astype(int)
    starts = np.cumsum([0, *map(len, rows)])
    amax: dict = {}
    kept: dict = {}
    # a session per wanted tensor, lean: the peak stays near the rewrite's own
    baseline = calibration.Baseline(run.in_path, names, skip_missing=True, segment_bytes=1, lean=True)
    for p, out in baseline.run(rows):
        mine = pick[(pick >= starts[p]) & (pick < starts[p + 1])] - starts[p]
        for name, x in out.items():
            x = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
            a = np.abs(x).max(axis=0)
            amax[name] = a if name not in amax else np.maximum(amax[name], a)
            if keep_rows:
                kept.setdefault(name, []).append(x[mine])
    heap.release()  # the calibration's freed activations
    empty = lambda k: np.zeros((0, k), np.float32)  # noqa: E731
    return {n: InputStats(a, np.concatenate(kept[n]) if keep_rows else empty(a.size)) for n, a in amax.items()}, count


def _block_rows(n: int) -> int:
    return max(C.FP4_BLOCK, BLOCK_BYTES // (8 * max(n, 1)) // C.FP4_BLOCK * C.FP4_BLOCK)


def _weight_nk(w, base_dir) -> np.ndarray:
    """The whole fp16 weight [N, K] of a graph MatMul constant [K, N] (the SmoothQuant search only)."""
    return np.ascontiguousarray(np.asarray(constant_array(w, base_dir)).astype(np.float16).T)


def _pqs(amax_x: np.ndarray, amax_w: np.ndarray, alpha: float) -> np.ndarray:
    """fp16 pre_quant_scale 1 / s, s = amax_x^a / amax_w^(1-a), normalised to a geometric mean of 1."""
    logs = alpha * np.log2(np.maximum(amax_x.astype(np.float64), 1e-8)) \
        - (1 - alpha) * np.log2(np.maximum(amax_w.astype(np.float64), 1e-8))
    logs -= logs.mean()
    return np.exp2(-np.clip(logs, -MAX_EXP, MAX_EXP)).astype(np.float16)


def _int8_error(x: np.ndarray, weights: list, amax_x: np.ndarray, pqs: np.ndarray | None, refs: list) -> float:
    """Relative output error of the int8 graph (x * p quantized per tensor, W / p per row) against x W^T, in
    fp32 (a trial: the chosen p is then quantized exactly by quantize_block)."""
    xs = x if pqs is None else (x.astype(np.float16) * pqs).astype(np.float32)
    s_in = np.float32(input_scale("int8_sq", amax_x, pqs))
    xq = np.clip(np.rint(xs / s_in), -128, 127) * s_in
    inv = None if pqs is None else (1 / pqs.astype(np.float32))
    num = den = 0.0
    for w, ref in zip(weights, refs):
        wp = w if inv is None else w * inv
        s = np.abs(wp).max(axis=1, keepdims=True) / np.float32(127)
        s[s == 0] = 1
        q = np.clip(np.rint(wp / s), -128, 127) * s
        num += float(np.sum((xq @ q.T - ref) ** 2))
        den += float(np.sum(ref ** 2))
    return float(np.sqrt(num / max(den, 1e-30)))


def smoothquant(x: np.ndarray, amax_x: np.ndarray, weights: list, alpha) -> tuple[np.ndarray | None, dict]:
    """(pre_quant_scale or None for no smoothing, what was tried) for the linears `weights` ([N, K] fp16) reading
    one input: `alpha` "search", "off" or a fixed strength."""
    if alpha == "off":
        return None, {"alpha": None}
    amax_w = np.max([np.abs(w.astype(np.float32)).max(axis=0) for w in weights], axis=0)
    if alpha != "search":
        return _pqs(amax_x, amax_w, float(alpha)), {"alpha": float(alpha)}
    xf = np.asarray(x, np.float32)
    w32 = [w.astype(np.float32) for w in weights]
    refs = [xf @ w.T for w in w32]
    off = _int8_error(xf, w32, amax_x, None, refs)
    best = (off, None, None)
    for a in ALPHAS:
        p = _pqs(amax_x, amax_w, float(a))
        err = _int8_error(xf, w32, amax_x, p, refs)
        if err < best[0]:
            best = (err, float(a), p)
    return best[2], {"alpha": best[1], "off_error": off, "error": best[0]}


# ---------------------------------------------------------------------- the linears, as a checkpoint holds them


@dataclass
class CalibratedLinear(wa_checkpoint.QuantLinear):
    """A QuantLinear whose big tensors (codes, NVFP4 block scales) are made when read (`tensors[...]`)."""

    dims: tuple = (0, 0)

    @property
    def shape(self) -> tuple[int, int]:
        return self.dims


class _LazyTensors(dict):
    def __init__(self, small: dict, make):
        super().__init__(small)
        self._make = make

    def __missing__(self, key):
        return self._make(key)


class CalibratedLinears:
    """What `wa_checkpoint.Checkpoint` is to the checkpoint route: `linears` {module: scheme} and `linear(module)`,
    here from the graph's fp16 weights and the calibration statistics."""

    def __init__(self, scheme: str, base_dir, alpha):
        self.scheme, self.base_dir, self.alpha = scheme, base_dir, alpha
        self.linears: dict = {}
        self._weights: dict = {}  # module -> (gs.Constant [K, N], input tensor name)
        self._small: dict = {}
        self._group_pqs: dict = {}  # input name -> pre_quant_scale or None
        self.smoothing: dict = {}  # input name -> the search's outcome (report)
        self._scales: dict = {}  # module -> NVFP4 block scales made while its codes streamed (_code_rows)
        self._scales_read: set = set()  # modules whose block scales the writer took first
        self.stats: dict = {}
        self.groups: dict = {}  # input name -> [module]

    def add(self, module: str, w, x_name: str) -> None:
        self.linears[module] = self.scheme
        self._weights[module] = (w, x_name)
        self.groups.setdefault(x_name, []).append(module)

    def _blocks(self, w):
        """(k0, [N, kb] fp16) blocks of input channels of the graph's [K, N] weight, read one at a time."""
        for k0, block in constant_row_blocks(w, self.base_dir, _block_rows(int(w.shape[1]))):
            yield k0, block.T

    def _pre_quant_scale(self, x_name: str):
        if x_name not in self._group_pqs:
            mods = self.groups[x_name]
            weights = [_weight_nk(self._weights[m][0], self.base_dir) for m in mods]
            st = self.stats[x_name]
            self._group_pqs[x_name], self.smoothing[x_name] = smoothquant(st.rows, st.amax, weights, self.alpha)
        return self._group_pqs[x_name]

    def _small_of(self, module: str) -> dict:
        if module not in self._small:
            w, x_name = self._weights[module]
            pqs = self._pre_quant_scale(x_name) if self.scheme == "int8_sq" else None
            amax, rows = 0.0, []
            for k0, block in self._blocks(w):
                a = np.abs(block.astype(np.float32))
                amax = max(amax, float(a.max()) if a.size else 0.0)
                if self.scheme == "int8_sq":
                    rows.append(smoothed_row_amax(block, None if pqs is None else pqs[k0:k0 + block.shape[1]]))
            row_amax = np.max(rows, axis=0) if rows else None
            small = weight_small(self.scheme, amax, row_amax)
            small["input_scale"] = input_scale(self.scheme, self.stats[x_name].amax, pqs)
            if pqs is not None:
                small["pre_quant_scale"] = pqs
            self._small[module] = small
        return self._small[module]

    def _code_rows(self, module: str, key: str = "weight"):
        """A linear's codes ("weight": FP8 / INT8 [N, K], NVFP4 packed [N, K/2]) or NVFP4 block scales
        ("weight_scale" [N, K/16]) in blocks of output rows, for the writer to stream (stream.produce_blocks), from
        the file or from memory alike, so no whole linear's codes are held (13.7 MB of FP8 at 1.5B dims, and
        NVFP4's float64 temporaries). Output rows are the graph's [K, N] weight's columns: each strip of
        STRIP_BYTES (fp16) is gathered in one pass over the weight's row blocks, then quantized CODE_BLOCK_BYTES
        (fp32) at a time. NVFP4's block scales come out of the same quantization: kept while the codes stream, for
        the writer's next read."""
        w, x_name = self._weights[module]
        small = self._small_of(module)
        pqs = self._pre_quant_scale(x_name) if self.scheme == "int8_sq" else None
        if key == "weight_scale" and module in self._scales:
            yield from self._scales.pop(module)
            return
        k, n = (int(d) for d in w.shape)
        rows = max(1, STRIP_BYTES // (2 * k))
        sub = max(1, CODE_BLOCK_BYTES // (4 * k))
        per_row = np.ndim(small.get("weight_scale")) == 1  # INT8: one scale per output row
        scales = None
        if self.scheme == "nvfp4" and key == "weight" and module not in self._scales_read:
            scales = self._scales[module] = []
        if key == "weight_scale":  # read before the codes: made here, and not kept when the codes stream
            self._scales_read.add(module)
        for n0 in range(0, n, rows):
            n1 = min(n, n0 + rows)
            strip = np.empty((n1 - n0, k), np.float16)
            for k0, block in constant_row_blocks(w, self.base_dir, _block_rows(n)):  # [kb, N]
                strip[:, k0:k0 + block.shape[0]] = block[:, n0:n1].T
            for r0 in range(0, n1 - n0, sub):
                r1 = min(n1 - n0, r0 + sub)
                part = dict(small, weight_scale=small["weight_scale"][n0 + r0:n0 + r1]) if per_row else small
                got = quantize_block(self.scheme, strip[r0:r1], part, pqs)
                if scales is not None:
                    scales.append(got["weight_scale"])
                yield got[key]
        del strip
        heap.release()  # the quantizer's freed temporaries (modelio/heap.py)

    def linear(self, module: str) -> CalibratedLinear:
        w, _ = self._weights[module]
        k, n = (int(d) for d in w.shape)
        return CalibratedLinear(module, self.scheme, _LazyTensors(self._small_of(module),
                                                                   lambda key: self._code_rows(module, key)), (n, k))


_PATH = re.compile(r"^/(?:[^/]+/)+MatMul$")


class Calibrated(wa_quant.WaQuant):
    """wa_quant's feature, its linears calibrated from the fp16 graph (no checkpoint folder)."""

    def __init__(self, scheme: str, calibration_file, alpha, lm_head: bool):
        super().__init__(checkpoint="")
        self.scheme, self.calibration, self.alpha, self.lm_head = scheme, calibration_file, alpha, lm_head

    def check(self, run, target) -> None:
        self.plan = plan(target, run.options.dtype, self.scheme)
        note = wa_quant.INT8_NOTE if self.scheme == "int8_sq" else self.plan.note
        run.warn(f"--quantize {_flag(self.scheme)}: {note}")
        self.set_opset(run, target, {self.scheme}, f"--quantize {_flag(self.scheme)}")
        self.ck = CalibratedLinears(self.scheme, run.source.base_dir, self.alpha)
        # by weight name: the build rewires some linears' inputs (o_proj reads the plugin), never their weights
        self.input_of = {w.name: node.inputs[0].name for node, w, k, n in weight_matmuls(run.source.graph)}
        self.ck.stats, self.tokens = input_stats(run, self.calibration, sorted(set(self.input_of.values())),
                                                 self.scheme == "int8_sq")

    def finder(self, run, lm_head):
        def find(node, w):
            x_name = self.input_of.get(w.name)
            if (node is lm_head and not self.lm_head) or x_name not in self.ck.stats:
                return None
            if self.scheme == "nvfp4" and int(w.shape[0]) % C.FP4_BLOCK:
                return None
            module = wa_quant.module_of(node.name) if _PATH.match(node.name) else w.name
            self.ck.add(module, w, x_name)
            return module

        return find

    def kept_fp16(self, node, lm_head) -> str:
        if node is lm_head and not self.lm_head:
            return "lm_head stays fp16 (--quantize-lm-head quantizes it)"
        if self.scheme == "nvfp4" and int(node.inputs[1].shape[0]) % C.FP4_BLOCK:
            return f"K={node.inputs[1].shape[0]} is not a multiple of NVFP4's block of 16"
        return "its input is not a tensor of the baseline: no calibrated activation range"

    def apply(self, run, build) -> None:
        super().apply(run, build)
        report = run.report.features[self.name]
        kept = [e for e in report["linears"] if not e["wa"] and not e["reason"].startswith("lm_head")]
        if not any(e["wa"] for e in report["linears"]):
            raise UnsupportedModel(f"--quantize {_flag(self.scheme)}: no linear can be quantized "
                                   f"({kept[0]['reason'] if kept else 'no MatMul with a constant weight'})")
        if kept:
            run.warn(f"--quantize {_flag(self.scheme)}: {len(kept)} linears stay fp16 (first: {kept[0]['node']}: "
                     f"{kept[0]['reason']}); the report lists each")
        report["calibration"] = {"tokens": self.tokens, "prompts": self.calibration or "bundled"}
        if self.scheme == "int8_sq":
            groups = self.ck.groups
            report["calibration"]["smoothquant"] = {" + ".join(groups[x]): v for x, v in self.ck.smoothing.items()}


def plan(target, dtype: str, scheme: str):
    """wa_quant's plan for the target, its refusal naming the flag."""
    try:
        return wa_quant.plan_for(target, dtype, scheme)
    except UnsupportedModel as exc:
        raise UnsupportedModel(str(exc).replace(wa_quant.NAMES[scheme], f"--quantize {_flag(scheme)}")) from None


def _flag(scheme: str) -> str:
    return next(f for f, s in FLAGS.items() if s == scheme)


def parse_alpha(value) -> str | float:
    if value in ("search", "off"):
        return value
    try:
        a = float(value)
    except (TypeError, ValueError):
        a = -1.0
    if not 0.0 <= a <= 1.0:
        raise RewriteError(f"--smoothquant-alpha '{value}': give search, off or a number from 0 to 1")
    return a


@dataclass
class WaCalibrateOptions(FeatureOptions):
    smoothquant_alpha: str = option("search", "--smoothquant-alpha", "INT8-SQ migration strength: search (per "
                                    "layer, default), off (no smoothing) or a number from 0 to 1")
    quantize_lm_head: bool = option(False, "--quantize-lm-head", "--quantize fp8/nvfp4/int8-sq: quantize lm_head "
                                    "too (it stays fp16 by default, as ModelOpt leaves it)", action="store_true")

    @classmethod
    def of(cls, options):
        self = super().of(options)
        self.quantize = options.quantize  # the flag lives in Int4Options (one --quantize)
        self.wa_checkpoint = options.wa_checkpoint
        return self

    def enabled(self) -> bool:
        return self.quantize in FLAGS and not self.wa_checkpoint

    def validate(self, target, options) -> None:
        parse_alpha(self.smoothquant_alpha)
        if self.smoothquant_alpha != "search" and self.quantize != "int8-sq":
            raise RewriteError(f"--smoothquant-alpha {self.smoothquant_alpha} needs --quantize int8-sq")
        if self.quantize_lm_head and self.quantize not in FLAGS:
            raise RewriteError("--quantize-lm-head needs --quantize fp8, nvfp4 or int8-sq")
        if self.quantize in FLAGS:
            if self.wa_checkpoint:
                raise UnsupportedModel(f"--quantize {self.quantize}: the checkpoint is already quantized "
                                       f"({self.wa_checkpoint}); export it without --quantize")
            check_choice(self.quantize, "--quantize", ("int4", *FLAGS), UnsupportedModel)
            plan(target, options.dtype, FLAGS[self.quantize])  # the target's refusals, before any work

    def feature(self, options) -> Calibrated:
        return Calibrated(FLAGS[self.quantize], options.calibration, parse_alpha(self.smoothquant_alpha),
                          self.quantize_lm_head)
