"""PagedRunner: the metadata it builds for the 0.11 graph, and a prefill that spans two KV pages."""

from __future__ import annotations

import numpy as np

from onnx_rewriter.reference.paged_runner import PagedRunner
from onnx_rewriter.reference.runner import Session, runner_for
from onnx_rewriter.verification.llm import verify


def test_metadata_and_pages(rewritten):
    out, _ = rewritten("llama", "edgellm-0.11", "float32")
    session = Session(out)
    runner = runner_for(session, batch=2, capacity=200)
    assert isinstance(runner, PagedRunner)
    feeds_seen, run = [], session.run
    session.run = lambda feeds: (feeds_seen.append(feeds), run(feeds))[1]
    spare = runner.pools[0][:, 0].copy()  # pages go out in descending order: page 0 is nobody's

    assert runner.prefill([[5, 6, 7], [8, 9]]).shape == (2, 320)
    f = feeds_seen[-1]
    assert f["inputs_embeds"].shape == (5, 64)
    assert f["positions"].tolist() == [0, 1, 2, 0, 1]
    assert f["query_start_offsets"].tolist() == [0, 3, 5] and f["query_lengths"].tolist() == [3, 2]
    assert f["past_lengths"].tolist() == [0, 0] and f["attention_sequence_lengths"].tolist() == [3, 2]
    assert len(f["execution_phase_marker"]) == 1 and len(f["context_sequence_count_carrier"]) == 2
    assert f["logits_indices"].tolist() == [2, 4]
    np.testing.assert_array_equal(f["rope_rotary_cos_sin"], session.rope_table[[0, 1, 2, 0, 1]])
    # 2 pages per sequence (capacity 200), 5 pages in all: seq 0 owns 4, 3; seq 1 owns 2, 1. Only used pages.
    assert f["kv_page_table"].tolist() == [[[4, -1], [9, -1]], [[2, -1], [7, -1]]]

    runner.step([[1, 2], [3]])  # chunked prefill: past > 0 and more than one token
    f = feeds_seen[-1]
    assert len(f["execution_phase_marker"]) == 2 and len(f["context_sequence_count_carrier"]) == 1
    assert f["positions"].tolist() == [3, 4, 2] and f["logits_indices"].tolist() == [1, 2]

    runner.decode([10, 11])
    f = feeds_seen[-1]
    assert len(f["execution_phase_marker"]) == 3 and len(f["context_sequence_count_carrier"]) == 0
    assert f["past_lengths"].tolist() == [5, 3] and f["positions"].tolist() == [5, 3]
    assert f["logits_indices"].tolist() == [0, 1]
    np.testing.assert_array_equal(runner.pools[0][:, 0], spare)  # nothing wrote to the spare page


def test_prefill_across_a_page_boundary(rewritten):
    """A 131-token prompt fills page 1 and spills into page 2 (pages out of order in the pool)."""
    out, ckpt = rewritten("llama", "edgellm-0.11", "float32")
    rng = np.random.default_rng(3)
    rows = [rng.integers(3, 320, 131).tolist(), rng.integers(3, 320, 4).tolist()]
    result = verify(out, model=str(ckpt), rows=rows, steps=2, quiet=True)
    assert result.passed, result.table()


# ------------------------------------------------------------------ edgellm-0.10: batch-major over a paged pool


def _run_010(out, pages=None, num_pages=None):
    """Prefill a 131-token and a 4-token row (row 0 spills into its second page), then 3 decode steps."""
    from onnx_rewriter.reference.runner import BatchPagedRunner

    session = Session(out)
    kw = {} if pages is None else dict(pages=pages, num_pages=num_pages)
    runner = BatchPagedRunner(session, batch=2, capacity=260, **kw)
    rng = np.random.default_rng(3)
    rows = [rng.integers(3, 320, 131).tolist(), rng.integers(3, 320, 4).tolist()]
    logits = [runner.prefill(rows)]
    for _ in range(3):
        logits.append(runner.decode(np.argmax(logits[-1], -1).tolist()))
    return np.stack(logits), runner


def test_010_shuffled_pages_give_the_contiguous_logits(rewritten):
    """Pages shuffled over a larger pool (non-contiguous, out of order, spares between) give exactly the
    logits of the identity table (K page = b·pages + j, V page = K page + num_pages)."""
    from onnx_rewriter.reference.runner import BatchPagedRunner, runner_for

    out, _ = rewritten("qwen3", "edgellm-0.10", "float32")  # q/k-norm inside the plugin
    assert isinstance(runner_for(Session(out), 2, 260), BatchPagedRunner)
    contiguous, runner = _run_010(out, pages=np.arange(6).reshape(2, 3), num_pages=6)
    assert runner.page_table(np.array([131, 4])).tolist() == [[[0, 1, -1], [6, 7, -1]], [[3, -1, -1], [9, -1, -1]]]
    shuffled_pages = np.random.default_rng(7).permutation(13)[:6].reshape(2, 3)
    shuffled, runner = _run_010(out, pages=shuffled_pages, num_pages=13)
    assert not np.all(np.diff(shuffled_pages.reshape(-1)) == 1)
    np.testing.assert_array_equal(shuffled, contiguous)


def test_010_swapped_page_table_rows_fail_verify(rewritten, monkeypatch):
    """A table whose two rows are swapped after prefill (each row decodes from the other's pages) fails
    verify; the same folder with the right table passes."""
    from onnx_rewriter.reference.paged_runner import PagePool

    out, ckpt = rewritten("llama", "edgellm-0.10", "float32")
    rng = np.random.default_rng(3)
    rows = [rng.integers(3, 320, 9).tolist(), rng.integers(3, 320, 6).tolist()]
    assert verify(out, model=str(ckpt), rows=rows, steps=2, quiet=True).passed
    right, calls = PagePool.page_table, []

    def swapped(self, kv_end):
        table = right(self, kv_end)
        calls.append(len(calls))
        return table[[1, 0]] if len(calls) > 1 else table

    monkeypatch.setattr(PagePool, "page_table", swapped)
    result = verify(out, model=str(ckpt), rows=rows, steps=2, quiet=True)
    assert len(calls) > 1 and not result.passed


def test_010_chunked_prefill_gives_the_whole_prompts_logits(rewritten):
    """The 0.10 graph in chunked-prefill mode (kvcache_start_index [B], S > 1; row 0's second chunk crosses a
    page): the same last-token logits as one prefill of the whole prompts."""
    from onnx_rewriter.reference.runner import BatchPagedRunner

    out, _ = rewritten("qwen3", "edgellm-0.10", "float32")
    rng = np.random.default_rng(5)
    rows = [rng.integers(3, 320, 133).tolist(), rng.integers(3, 320, 7).tolist()]
    whole = BatchPagedRunner(Session(out), batch=2, capacity=260).prefill(rows)
    runner = BatchPagedRunner(Session(out), batch=2, capacity=260)
    runner.prefill([rows[0][:120], rows[1][:3]])
    chunked = runner.chunk([rows[0][120:], rows[1][3:]])
    np.testing.assert_allclose(chunked, whole, rtol=1e-4, atol=1e-4)
