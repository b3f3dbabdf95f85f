"""Run a rewritten EdgeLLM folder on the CPU the way the runtime drives it: prefill, then decode steps.

The graph runs in `onnx.reference.ReferenceEvaluator` with the numpy AttentionPlugin as a custom op.
Why not onnxruntime: ORT has no Python custom-op route without onnxruntime-extensions (whose builds lag
ORT releases), and splitting the graph at every plugin node costs more code than it saves on tiny
models. The evaluator runs a 2-layer tiny model's prefill in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from safetensors.numpy import load_file

from onnx_rewriter.analysis.rope import runtime_rope_table

from ..errors import RewriteError
from ..modelio.config_file import read_config
from .lora import dummy_feeds, lora_inputs
from .ops import REFERENCE_OPS
from .paged_runner import PagedRunner, PagePool
from .vocab_map import load_map


def _evaluator(model_path: Path):
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(str(model_path))
    return model, ReferenceEvaluator(model, new_ops=REFERENCE_OPS)


class Session:
    """A loaded output folder: graph, embedding table, config; knows the graph's float dtype."""

    def __init__(self, out_dir, rope_table: np.ndarray | None = None, lora: dict | None = None,
                 embedding: np.ndarray | None = None):
        out_dir = Path(out_dir)
        self.check_folder(out_dir, embedding is None)
        self.config = read_config(out_dir / "config.json", fix="rewrite the folder again")
        # an EAGLE3 draft folder has no table of its own: the base's rows are given
        self.embedding = embedding if embedding is not None else load_file(
            str(out_dir / "embedding.safetensors"))["embedding"]
        self.model, self.evaluator = _evaluator(out_dir / "model.onnx")
        inputs = {i.name: i for i in self.model.graph.input}
        self.inputs = inputs
        elem = inputs["inputs_embeds"].type.tensor_type.elem_type
        self.float = onnx.helper.tensor_dtype_to_np_dtype(elem)
        self.num_layers = sum(1 for n in inputs if n.startswith("past_key_values_"))
        # the cache's own dtype: the float type, or FLOAT8E4M3FN with an FP8 KV cache
        self.cache_dtype = onnx.helper.tensor_dtype_to_np_dtype(
            inputs["past_key_values_0"].type.tensor_type.elem_type) if self.num_layers else self.float
        self.max_positions = 512
        self.rope_table = rope_table if rope_table is not None else runtime_rope_table(self.config, self.max_positions)

        self.vocab_map = load_map(out_dir)  # logits index i is token vocab_map[i] (None: the full vocabulary)
        # LoRA slots: the given adapter tensors, rank-0 dummies elsewhere (as the runtime binds them)
        self.lora_inputs = lora_inputs(self.model)
        self.lora = {**dummy_feeds(self.lora_inputs, self.float), **(lora or {})}

    def token(self, index: int) -> int:
        """The token id of logits index `index`."""
        return int(index) if self.vocab_map is None else int(self.vocab_map[index])

    @staticmethod
    def check_folder(out_dir, embedding: bool = True) -> None:
        out_dir = Path(out_dir)
        if not out_dir.is_dir():
            raise RewriteError(f"'{out_dir}' is not a folder; give a folder written by onnx_rewriter")
        for name in ("model.onnx", "config.json") + (("embedding.safetensors",) if embedding else ()):
            if not (out_dir / name).is_file():
                raise RewriteError(f"'{out_dir}' has no {name}; give a folder written by onnx_rewriter "
                                   f"(python -m onnx_rewriter IN.onnx {out_dir})")

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.embedding[ids].astype(self.float)

    def step_inputs(self, ids: np.ndarray) -> dict:
        """Inputs beyond the target's own for the tokens `ids` (the VLM verify feeds deepstack here)."""
        return {}

    def rope_rows(self, seq: int, positions: np.ndarray) -> np.ndarray:
        """Table rows of sequence `seq` at KV positions `positions`: one shared table, or one per
        sequence ([B, P, R], M-RoPE)."""
        t = self.rope_table
        return t[positions] if t.ndim == 2 else t[seq, positions]

    def run(self, feeds: dict) -> dict:
        names = [o.name for o in self.model.graph.output]
        return dict(zip(names, self.evaluator.run(None, {**self.lora, **feeds})))


def _padded(rows: list[list[int]]) -> np.ndarray:
    ids = np.zeros((len(rows), max(len(r) for r in rows)), dtype=np.int64)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = r
    return ids


class DenseRunner:
    """Batch-major dense-cache targets (edgellm-0.5, edgellm-0.9); BatchPagedRunner (0.10) changes the cache."""

    def __init__(self, session: Session, batch: int, capacity: int):
        self.s = session
        cfg = session.config
        hkv, d = cfg["num_key_value_heads"], cfg["head_dim"]
        self.cache = [np.zeros((batch, 2, hkv, capacity, d), dtype=session.cache_dtype)
                      for _ in range(session.num_layers)]
        self.lengths = np.zeros(batch, dtype=np.int64)

    def cache_feeds(self, kv_end: np.ndarray) -> dict:
        """The cache inputs for a call after which row b holds kv_end[b] tokens."""
        return {f"past_key_values_{i}": c for i, c in enumerate(self.cache)}

    def keep(self, out: dict) -> None:
        self.cache = [out[f"present_key_values_{i}"] for i in range(len(self.cache))]

    def _step(self, ids, context_lengths, start, last, kv_end) -> np.ndarray:
        table = self.s.rope_table
        feeds = {
            "inputs_embeds": self.s.embed(ids),
            "context_lengths": context_lengths.astype(np.int32),
            "rope_rotary_cos_sin": table if table.ndim == 3 else table[None],  # M-RoPE: one table per row
            "kvcache_start_index": start.astype(np.int32),
            "last_token_ids": last.astype(np.int64).reshape(-1, 1),
        }
        feeds.update(self.cache_feeds(kv_end))
        feeds.update(self.s.step_inputs(ids))
        out = self.s.run(feeds)
        self.keep(out)
        return np.asarray(out["logits"], dtype=np.float32)[:, 0]

    def prefill(self, rows: list[list[int]]) -> np.ndarray:
        """Right-padded ragged prefill; returns each row's last-token logits [B, V]."""
        ids = _padded(rows)
        self.lengths = np.array([len(r) for r in rows])
        return self._step(ids, self.lengths, np.zeros((0,), np.int32), self.lengths - 1, self.lengths)

    def chunk(self, rows: list[list[int]]) -> np.ndarray:
        """Chunked prefill: append rows[b] (right-padded) to row b's cache; each row's last-token logits."""
        ids = _padded(rows)
        n = np.array([len(r) for r in rows])
        start = self.lengths.copy()
        self.lengths = self.lengths + n
        return self._step(ids, n, start, np.maximum(n - 1, 0), self.lengths)

    def decode(self, tokens: list[int]) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        start = self.lengths.copy()
        self.lengths = self.lengths + 1
        return self._step(ids, self.lengths, start, np.zeros(len(tokens)), self.lengths)


class BatchPagedRunner(PagePool, DenseRunner):
    """edgellm-0.10: DenseRunner's batch-major calls over a paged pool and its `kv_page_table` (PagePool:
    pages out of order, a spare page, noise in the pool)."""

    def __init__(self, session: Session, batch: int, capacity: int, **pages):
        PagePool.__init__(self, session, batch, capacity, **pages)
        self.s = session
        self.lengths = np.zeros(batch, dtype=np.int64)

    def cache_feeds(self, kv_end: np.ndarray) -> dict:
        pools = {f"past_key_values_{i}": p for i, p in enumerate(self.pools)}
        return {"kv_page_table": self.page_table(kv_end), **pools}

    def keep(self, out: dict) -> None:
        self.pools = [out[f"present_key_values_{i}"] for i in range(len(self.pools))]


def runner_for(session: Session, batch: int, capacity: int):
    if "kv_page_table" in session.inputs:
        if "kvcache_start_index" in session.inputs:  # batch-major: 0.10
            return BatchPagedRunner(session, batch, capacity)
        return PagedRunner(session, batch, capacity)
    return DenseRunner(session, batch, capacity)
