"""Calibration: a small prompt set run through the baseline ONNX with onnxruntime, reading the tensors a
feature needs (today: each layer's K and V for the FP8 KV cache scales).

The baseline is run as exported (no rewrite), with the wanted intermediate tensors added as graph outputs;
its weights stay where they are (memory-mapped from the baseline's files, never copied beside it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from .errors import RewriteError

# The bundled calibration set: short, varied English prompts (chat, code, lists, numbers). Kept tiny so
# calibration costs a few forward passes; `--calibration FILE` (one prompt a line) replaces it.
DEFAULT_PROMPTS = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Explain in two sentences why the sky looks blue during the day and red at sunset.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
    "Shopping list: eggs, milk, flour, two apples, a loaf of bread, coffee beans and olive oil.",
    "Q: What is 17 multiplied by 23? A: 17 times 23 equals 391, because 17 * 20 = 340 and 17 * 3 = 51.",
    "Dear team, the meeting moved to Thursday at 3 pm; please bring the quarterly figures.",
    "In 1969 the Apollo 11 mission landed two astronauts on the Moon and returned them safely.",
    "Translate to French: Good morning, how are you today? I would like a cup of tea, please.",
)
MAX_TOKENS = 64  # per prompt: K/V ranges settle within a few dozen tokens


def prompts(path: str | None) -> list[str]:
    if path is None:
        return list(DEFAULT_PROMPTS)
    try:
        lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise RewriteError(f"--calibration '{path}': cannot read it ({exc}); give a text file, one prompt a line") \
            from None
    lines = [ln for ln in lines if ln]
    if not lines:
        raise RewriteError(f"--calibration '{path}' holds no prompt; give a text file, one prompt a line")
    return lines


def token_rows(run, texts: list[str]) -> list[list[int]]:
    """The prompts as token ids, through the tokenizer.json the rewrite writes beside the model."""
    from tokenizers import Tokenizer

    from .sidefiles.writer import tokenizer_dir

    path = tokenizer_dir(run) / "tokenizer.json"
    if not path.is_file():
        raise RewriteError(f"calibration needs the model's tokenizer: no tokenizer.json in '{path.parent}' "
                           f"(pass --tokenizer DIR)")
    tok = Tokenizer.from_file(str(path))
    vocab = int(run.spec.get("vocab_size") or 0)
    rows = []
    for text in texts:
        ids = tok.encode(text).ids[:MAX_TOKENS]
        if ids and (not vocab or max(ids) < vocab):
            rows.append(ids)
    if not rows:
        raise RewriteError("calibration: no prompt gave tokens inside the model's vocabulary")
    return rows


class BaselineSession:
    """The baseline ONNX in onnxruntime with extra outputs `names` (intermediate tensors)."""

    def __init__(self, path: Path, names: list[str], skip_missing: bool = False):
        import onnxruntime as ort

        model = onnx.load(str(path), load_external_data=False)
        known = {o for n in model.graph.node for o in n.output}
        missing = [n for n in names if n not in known]
        if missing and not skip_missing:
            raise RewriteError(f"calibration: tensor '{missing[0]}' is not in the baseline '{path}' as exported")
        names = [n for n in names if n in known]
        have = {o.name for o in model.graph.output}
        model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in have)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # The weights stay in the baseline's files, memory-mapped and handed to onnxruntime by name.
        files = sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})
        maps = [np.memmap(Path(path).parent / f, dtype=np.uint8, mode="r") for f in files]
        if files:
            opts.add_external_initializers_from_files_in_memory(files, maps, [m.size for m in maps])
        self.sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        del maps
        self.names = names
        self.inputs = self.sess.get_inputs()

    def close(self) -> None:
        self.sess = None

    def __call__(self, ids: list[int]) -> dict[str, np.ndarray]:
        n = len(ids)
        feeds = {}
        for i in self.inputs:
            if i.name == "input_ids":
                feeds[i.name] = np.asarray([ids], np.int64)
            elif i.name == "attention_mask":
                feeds[i.name] = np.ones((1, n), np.int64)
            elif i.name == "position_ids":
                feeds[i.name] = np.arange(n, dtype=np.int64)[None]
            elif "past" in i.name:  # a KV-cache export: an empty past [1, H, 0, D]
                dims = [d if isinstance(d, int) else (1 if k == 0 else 0) for k, d in enumerate(i.shape)]
                feeds[i.name] = np.zeros(dims, np.float16 if "float16" in i.type else np.float32)
            else:
                raise RewriteError(f"calibration: cannot feed the baseline's input '{i.name}'")
        return dict(zip(self.names, self.sess.run(self.names, feeds)))


def calibrate_kv(run, path: str | None) -> list[tuple[float, float]]:
    """(k_scale, v_scale) per layer: amax / 448 of the roped K and of V over the calibration prompts, as the
    runtime's exporter computes them (per tensor, per layer)."""
    from .reference import fp8
    from .reference.plugin import apply_rope
    from .targets.base import layer_rope_table

    rows = token_rows(run, prompts(path))
    names = [t.name for layer in run.layers for t in (layer.k, layer.v)]
    sess = BaselineSession(run.in_path, names)
    amax = np.zeros((len(run.layers), 2))
    try:
        for ids in rows:
            out = sess(ids)
            for i, layer in enumerate(run.layers):
                k = np.asarray(out[layer.k.name], np.float32).transpose(0, 2, 1, 3)  # [B, S, Hkv, D]
                k = apply_rope(k, layer_rope_table(layer, len(ids)))  # dims past rotary_dim pass through
                v = np.asarray(out[layer.v.name], np.float32)
                amax[i] = np.maximum(amax[i], [np.abs(k).max(), np.abs(v).max()])
    finally:
        sess.close()
    scales = np.where(amax > 0, amax / fp8.E4M3_MAX, 1.0).astype(np.float32)
    return [(float(k), float(v)) for k, v in scales]


ROWS = 128  # activation rows kept per linear for the INT4 scale search (cost: 9 trial GEMMs of ROWS x K x N)


def linear_inputs(run, path: str | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per MatMul weight name: (mean |x| per input channel [K], up to ROWS rows of x [m, K]) over the
    calibration prompts, x the MatMul's input in the baseline. A linear whose input the baseline does not
    hold under the same name (normalization made it) is left out."""
    import onnx_graphsurgeon as gs

    linears = {}
    for node in run.source.graph.nodes:
        if node.op == "MatMul" and isinstance(node.inputs[1], gs.Constant) and len(node.inputs[1].shape) == 2 \
                and not isinstance(node.inputs[0], gs.Constant):
            linears.setdefault(node.inputs[0].name, []).append(node.inputs[1].name)
    rows = token_rows(run, prompts(path))
    sess = BaselineSession(run.in_path, list(linears), skip_missing=True)
    sums: dict = {}
    kept: dict = {}
    count = 0
    try:
        for ids in rows:
            out = sess(ids)
            count += len(ids)
            for name, x in out.items():
                x = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
                sums[name] = sums.get(name, 0) + np.abs(x).sum(axis=0)
                kept[name] = np.concatenate([kept[name], x]) if name in kept else x
    finally:
        sess.close()
    out = {}
    for name, total in sums.items():
        x = kept[name]
        pick = np.linspace(0, len(x) - 1, min(ROWS, len(x))).astype(int)
        for w in linears[name]:
            out[w] = (total / count, x[pick])
    return out
