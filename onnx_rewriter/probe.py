"""Numbers before fusing: run the mask and position subgraphs on probe inputs and read what they do.

The plugin is always causal (optionally windowed) and numbers positions 0..S-1 itself. A graph whose
mask or positions compute something else (bidirectional, a different window, shifted positions) must
not be fused, whatever its nodes look like. The subgraphs involved are tiny: onnxruntime runs them.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from .errors import PatternMismatch
from .layers import AttentionLayer
from .matching import const

log = logging.getLogger(__name__)

SHORT = 48  # probe length when no window hint is in sight
MAX_PROBE = 4200  # covers 4096-token windows; [1, 1, S, S] stays under 100 MB


def _feeds(graph: gs.Graph, s: int) -> dict:
    feeds = {}
    for t in graph.inputs:
        if t.name == "inputs_embeds":
            feeds[t.name] = np.zeros((1, s, t.shape[-1]), dtype=t.dtype)
        elif t.name == "position_ids":
            feeds[t.name] = np.arange(s, dtype=np.int64)[None]
        elif t.name == "attention_mask":
            feeds[t.name] = np.ones((1, s), dtype=t.dtype or np.int64)
        elif t.name == "input_ids":
            feeds[t.name] = np.zeros((1, s), dtype=t.dtype or np.int64)
    return feeds


class MaskProbe:
    def __init__(self, graph: gs.Graph, base_dir):
        self.graph = graph
        self._cache: dict[tuple[str, int], np.ndarray] = {}

    def _eval(self, tensors: list[gs.Tensor], s: int) -> list[np.ndarray]:
        key = tuple(t.name for t in tensors)
        sub = self.graph.copy()
        by_name = sub.tensors()
        outs = [by_name[n] for n in key]
        for o in outs:
            o.dtype, o.shape = o.dtype or None, None
        sub.outputs = outs
        sub.cleanup()
        sub.inputs = [t for t in sub.inputs if t.outputs]
        for t in sub.tensors().values():
            if isinstance(t, gs.Constant) and const(t) is None:
                raise PatternMismatch(f"the mask/position subgraph reads the large weight '{t.name}'; cannot check it")
        model = gs.export_onnx(sub, do_type_check=False)
        del model.graph.value_info[:]
        feeds = {k: v for k, v in _feeds(sub, s).items() if k in {i.name for i in sub.inputs}}
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return sess.run(list(key), feeds)

    def _allowed(self, mask: gs.Tensor, s: int) -> np.ndarray:
        key = (mask.name, s)
        if key not in self._cache:
            m = np.asarray(self._eval([mask], s)[0])
            allowed = m if m.dtype == np.bool_ else (m > -1.0)
            allowed = np.broadcast_to(allowed, allowed.shape[:-2] + (s, s))
            self._cache[key] = allowed.reshape(-1, s, s)[0]
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
        if pos.size % s or not np.array_equal(pos.reshape(-1, s)[0], np.arange(s)):
            raise PatternMismatch(f"layer {layer.index}: RoPE positions are not 0..S-1 "
                                  f"(got {pos.reshape(-1)[:6].tolist()}...), the plugin cannot reproduce them")
        q, k = np.indices((s, s))
        causal = k <= q
        if np.array_equal(allowed, causal):
            return None
        w = int(allowed[-1].sum())
        if 0 < w < s and np.array_equal(allowed, causal & (q - k < w)):
            return w
        raise PatternMismatch(f"layer {layer.index}: the attention mask is neither causal nor a causal sliding "
                              f"window (probe with {s} tokens); the plugin cannot reproduce it")
