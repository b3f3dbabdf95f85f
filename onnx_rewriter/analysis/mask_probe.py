"""Numbers before fusing: run the mask and position subgraphs on probe inputs and read what they do.

The plugin is always causal (optionally windowed) and numbers positions 0..S-1 itself. A graph whose
mask or positions compute something else (bidirectional, a different window, shifted positions) must
not be fused, whatever its nodes look like. The subgraphs involved are tiny: onnxruntime runs them.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort

from onnx_rewriter.errors import PatternMismatch
from onnx_rewriter.matching import const
from onnx_rewriter.matching.results import AttentionLayer

log = logging.getLogger(__name__)

SHORT = 48  # probe length when no window hint is in sight
MAX_PROBE = 4200  # covers 4096-token windows; [2, 1, S, S] stays under 200 MB
# Two batch rows (unless an input fixes batch 1): a mask or position path that only works for batch 1
# (a constant where the batch dim belongs) fails to run here instead of being fused into a graph the
# baseline never computed.
BATCH = 2


def _feeds(graph: gs.Graph, s: int, past: int = 0) -> dict:
    feeds = {}
    for t in graph.inputs:
        b = t.shape[0] if t.shape and isinstance(t.shape[0], (int, np.integer)) and t.shape[0] > 0 else BATCH
        if t.name == "inputs_embeds":
            feeds[t.name] = np.zeros((b, s, t.shape[-1]), dtype=t.dtype)
        elif t.name == "position_ids":
            if t.shape is not None and len(t.shape) == 3:  # M-RoPE's [3, B, S]: text tokens, t = h = w
                rows = t.shape[1] if isinstance(t.shape[1], (int, np.integer)) and t.shape[1] > 0 else BATCH
                feeds[t.name] = np.tile(np.arange(past, past + s, dtype=np.int64), (3, rows, 1))
            else:
                feeds[t.name] = np.tile(np.arange(past, past + s, dtype=np.int64), (b, 1))
        elif t.name == "attention_mask":
            feeds[t.name] = np.ones((b, past + s), dtype=t.dtype or np.int64)
        elif t.name == "input_ids":
            feeds[t.name] = np.zeros((b, s), dtype=t.dtype or np.int64)
        elif _is_cache_input(t):
            # An export's own KV cache [B, Hkv, P, D]: `past` cached tokens (values unused).
            shape = [b if i == 0 else d if isinstance(d, (int, np.integer)) else past
                     for i, d in enumerate(t.shape)]
            feeds[t.name] = np.zeros(shape, dtype=t.dtype)
        elif t.shape is not None and len(t.shape) == 3 and t.dtype is not None and np.issubdtype(t.dtype, np.floating):
            # another per-token float input [B, S, X] (an EAGLE3 draft's hidden states): its values never reach
            # the mask, its shape may
            feeds[t.name] = np.zeros((b, s, t.shape[-1]), dtype=t.dtype)
    return feeds


def _one_row(rows: np.ndarray, what: str) -> np.ndarray:
    """The rows of identical batch rows (and heads) must agree: the plugin applies one rule to all."""
    if not all(np.array_equal(r, rows[0]) for r in rows[1:]):
        raise PatternMismatch(f"the {what} differs between identical batch rows; the plugin cannot reproduce it")
    return rows[0]


def _positions_are(pos: np.ndarray, s: int, start: int) -> bool:
    """Every row of the probed positions is start..start+s-1."""
    return pos.size % s == 0 and np.array_equal(_one_row(pos.reshape(-1, s), "RoPE positions"),
                                                np.arange(start, start + s))


def _is_cache_input(t: gs.Tensor) -> bool:
    return t.shape is not None and len(t.shape) == 4 and t.dtype is not None and np.issubdtype(t.dtype, np.floating)


class MaskProbe:
    def __init__(self, graph: gs.Graph, base_dir):
        self.graph = graph
        self._cache: dict[tuple[str, int], np.ndarray] = {}
        self._evals: dict[tuple, list[np.ndarray]] = {}

    def _eval(self, tensors: list[gs.Tensor], s: int, past: int = 0) -> list[np.ndarray]:
        """Run only the nodes the wanted tensors depend on, once per (tensors, s, past): all layers share
        one mask and one position path. No graph.copy(): the subgraph reuses the model's node objects
        (24 copies of a whole 24-layer graph made this the slowest step of the rewrite)."""
        key = tuple(t.name for t in tensors)
        if (key, s, past) in self._evals:
            return self._evals[(key, s, past)]
        nodes, inputs, seen, stack = [], [], set(), list(tensors)
        graph_inputs = {id(t) for t in self.graph.inputs}
        while stack:
            t = stack.pop()
            if id(t) in seen:
                continue
            seen.add(id(t))
            if isinstance(t, gs.Constant):
                if const(t) is None:
                    raise PatternMismatch(f"the mask/position subgraph reads the large weight '{t.name}'; "
                                          f"cannot check it")
                continue
            if id(t) in graph_inputs:
                inputs.append(t)
            for n in t.inputs:
                if id(n) not in seen:
                    seen.add(id(n))
                    nodes.append(n)
                    stack.extend(x for x in n.inputs if x.name)
        order = {id(n): i for i, n in enumerate(self.graph.nodes)}
        nodes.sort(key=lambda n: order.get(id(n), -1))
        sub = gs.Graph(nodes=nodes, inputs=inputs, outputs=list(tensors), opset=self.graph.opset,
                       import_domains=self.graph.import_domains, ir_version=self.graph.ir_version)
        model = gs.export_onnx(sub, do_type_check=False)
        del model.graph.value_info[:]
        for o in model.graph.output:  # any shape: the graph's own may be symbolic or stale
            if o.type.HasField("tensor_type"):
                o.type.tensor_type.ClearField("shape")
        feeds = {k: v for k, v in _feeds(sub, s, past).items() if k in {i.name for i in inputs}}
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        self._evals[(key, s, past)] = sess.run(list(key), feeds)
        return self._evals[(key, s, past)]

    def _allowed(self, mask: gs.Tensor, s: int) -> np.ndarray:
        key = (mask.name, s)
        if key not in self._cache:
            m = np.asarray(self._eval([mask], s)[0])
            allowed = m if m.dtype == np.bool_ else (m > -1.0)
            allowed = np.broadcast_to(allowed, allowed.shape[:-2] + (s, s))
            self._cache[key] = _one_row(allowed.reshape(-1, s, s), "attention mask")
        return self._cache[key]

    def _hint(self, mask: gs.Tensor) -> int:
        """Largest small integer constant feeding the mask: a window size, if there is one."""
        seen, stack, best = set(), [mask], 0
        while stack:
            t = stack.pop()
            if id(t) in seen:
                continue
            seen.add(id(t))
            v = const(t)
            if v is not None and v.size == 1 and np.issubdtype(v.dtype, np.integer):
                best = max(best, int(v.reshape(())))
            for n in t.inputs:
                stack.extend(n.inputs)
        return best

    def _check_with_past(self, layer: AttentionLayer, window: int | None, past: int = 5, s: int = 4) -> None:
        """Exports with their own cache: with `past` cached tokens, token t must sit at position past + t
        and see keys 0..past+t (within the window), as the plugin does after a chunked prefill."""
        try:
            m, pos = (np.asarray(x) for x in self._eval([layer.mask, layer.rope.positions], s, past))
        except Exception as exc:
            raise PatternMismatch(f"layer {layer.index}: cannot evaluate the attention mask with a past "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
        allowed = (m if m.dtype == np.bool_ else m > -1.0)
        allowed = _one_row(np.broadcast_to(allowed, allowed.shape[:-2] + (s, past + s)).reshape(-1, s, past + s),
                           "attention mask")
        q, k = np.indices((s, past + s))
        want = (k <= q + past) & ((q + past - k < window) if window else True)
        if not _positions_are(pos, s, past):
            raise PatternMismatch(f"layer {layer.index}: with {past} cached tokens the RoPE positions are "
                                  f"{pos.reshape(-1)[:s].tolist()}, not {list(range(past, past + s))}")
        if not np.array_equal(allowed, want):
            raise PatternMismatch(f"layer {layer.index}: with {past} cached tokens the attention mask is not causal "
                                  f"over cache and new tokens; the plugin cannot reproduce it")

    def window_of(self, layer: AttentionLayer) -> int | None:
        """None for plain causal, W for a sliding window; refuses anything else, naming the layer."""
        hint = self._hint(layer.mask)
        s = min(max(SHORT, hint + 2), MAX_PROBE)
        try:
            allowed = self._allowed(layer.mask, s)
            pos = np.asarray(self._eval([layer.rope.positions], s)[0])
        except PatternMismatch as exc:
            raise PatternMismatch(f"layer {layer.index}: {exc}") from None
        except Exception as exc:
            raise PatternMismatch(f"layer {layer.index}: cannot evaluate the attention mask ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0][:120]})") from None
        if not _positions_are(pos, s, 0):
            raise PatternMismatch(f"layer {layer.index}: RoPE positions are not 0..S-1 "
                                  f"(got {pos.reshape(-1)[:6].tolist()}...), the plugin cannot reproduce them")
        q, k = np.indices((s, s))
        causal = k <= q
        w = int(allowed[-1].sum())
        if np.array_equal(allowed, causal) or (0 < w < s and np.array_equal(allowed, causal & (q - k < w))):
            w = None if np.array_equal(allowed, causal) else w
            if any(_is_cache_input(t) for t in self.graph.inputs):
                self._check_with_past(layer, w)
            return w
        raise PatternMismatch(f"layer {layer.index}: the attention mask is neither causal nor a causal sliding "
                              f"window (probe with {s} tokens); the plugin cannot reproduce it")
