"""Drive an `edgellm-0.11` folder (token-major, paged KV pool) the way the runtime does; `PagePool` also
serves the batch-major 0.10 runner (runner.BatchPagedRunner).

Same interface as `runner.DenseRunner`: `prefill(rows) -> [B, V]`, `decode(tokens) -> [B, V]`. Ragged
sequences are packed one after the other in T (no padding), each sequence owns whole 128-token pages of
a shared pool, and every metadata input is built from the per-sequence lengths.

Pages are handed out in descending order (sequence 0 gets the highest page numbers, and a sequence's
later pages have lower numbers than its earlier ones), one spare page is never handed out, and the pool
starts as noise rather than zeros: a graph or plugin that assumed pages in sequence order, or read
slots nobody wrote, shows up as a wrong answer instead of passing by luck.
"""

from __future__ import annotations

import numpy as np

from .plugin import PAGE_SIZE

PREFILL, CHUNKED, DECODE = 1, 2, 3  # execution_phase_marker lengths


class PagePool:
    """Paged KV pools for `batch` sequences of up to `capacity` tokens (0.10 and 0.11), pages handed out as
    described above; `pages` [batch, pages_per_seq] chooses them instead (`num_pages` the pool's size)."""

    def __init__(self, session, batch: int, capacity: int, pages=None, num_pages: int | None = None):
        cfg = session.config
        hkv, d = cfg["num_key_value_heads"], cfg["head_dim"]
        self.pages_per_seq = -(-capacity // PAGE_SIZE)
        self.num_pages = num_pages or batch * self.pages_per_seq + 1  # + a spare page nobody owns
        if pages is None:
            order = np.arange(self.num_pages)[::-1]
            pages = order[:batch * self.pages_per_seq].reshape(batch, self.pages_per_seq)
        self.pages = np.asarray(pages)
        rng = np.random.default_rng(0)
        self.pools = [rng.standard_normal((2, self.num_pages, PAGE_SIZE, hkv, d)).astype(session.cache_dtype)
                      for _ in range(session.num_layers)]

    def page_table(self, kv_end: np.ndarray) -> np.ndarray:
        """[N, 2, pages_per_seq]: K pages, then V pages (= K page + num_pages); -1 past each sequence's end."""
        table = np.full((len(kv_end), 2, self.pages_per_seq), -1, dtype=np.int32)
        for n, end in enumerate(kv_end):
            used = -(-int(end) // PAGE_SIZE)
            table[n, 0, :used] = self.pages[n, :used]
            table[n, 1, :used] = self.pages[n, :used] + self.num_pages
        return table


class PagedRunner(PagePool):
    def __init__(self, session, batch: int, capacity: int):
        super().__init__(session, batch, capacity)
        self.s = session
        self.lengths = np.zeros(batch, dtype=np.int64)

    def step(self, rows: list[list[int]]) -> np.ndarray:
        """Append rows[n] to sequence n (an empty row leaves it alone); the last new token's logits [N, V]."""
        qlen = np.array([len(r) for r in rows], dtype=np.int64)
        past = self.lengths.copy()
        if np.any(past + qlen > self.pages_per_seq * PAGE_SIZE):
            raise ValueError(f"sequence longer than the runner's capacity of {self.pages_per_seq * PAGE_SIZE} tokens")
        offsets = np.concatenate([[0], np.cumsum(qlen)])
        ids = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows])
        positions = np.concatenate([p + np.arange(q) for p, q in zip(past, qlen)]).astype(np.int64)
        if np.all(qlen == 1):
            phase = DECODE
        else:
            phase = PREFILL if not past.any() else CHUNKED
        context = int(np.count_nonzero(qlen > 1)) if phase != DECODE else 0
        feeds = {
            "inputs_embeds": self.s.embed(ids),
            "rope_rotary_cos_sin": np.concatenate([self.s.rope_rows(n, p + np.arange(q))
                                                   for n, (p, q) in enumerate(zip(past, qlen))]),
            "positions": positions.astype(np.int32),
            "query_start_offsets": offsets.astype(np.int32),
            "query_lengths": qlen.astype(np.int32),
            "past_lengths": past.astype(np.int32),
            "attention_sequence_lengths": (past + qlen).astype(np.int32),
            "state_indices": np.arange(len(rows), dtype=np.int32),
            "execution_phase_marker": np.zeros(phase, dtype=np.int32),
            "context_sequence_count_carrier": np.zeros(context, dtype=np.int32),
            "kv_page_table": self.page_table(past + qlen),
            "logits_indices": np.maximum(offsets[1:] - 1, 0).astype(np.int64),
        }
        feeds.update({f"past_key_values_{i}": p for i, p in enumerate(self.pools)})
        feeds.update(self.s.step_inputs(ids))
        out = self.s.run(feeds)
        self.pools = [out[f"present_key_values_{i}"] for i in range(len(self.pools))]
        self.lengths = past + qlen
        return np.asarray(out["logits"], dtype=np.float32)

    def prefill(self, rows: list[list[int]]) -> np.ndarray:
        """Packed ragged prefill of fresh sequences; each row's last-token logits [B, V]."""
        self.lengths[:] = 0
        return self.step(rows)

    def decode(self, tokens: list[int]) -> np.ndarray:
        return self.step([[int(t)] for t in tokens])
