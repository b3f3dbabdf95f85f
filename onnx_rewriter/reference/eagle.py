"""EAGLE3 speculative greedy decoding on the CPU reference (edgellm-0.5, 0.9, 0.10; 0.11 as inferred).

The base and draft folders run as the runtime drives them (contract part 2 §11, part 3 §18.2):

1. base prefill of the prompt (n tokens): logits of every row, `hidden_states` [1, n, 3H]; t = argmax of the
   last row;
2. draft prefill: row i gets the embedding of token i+1 (the prompt shifted, then t) and the base's hidden
   row i; its last row gives the first draft log-probs and the root's draft hidden state;
3. per round, the draft proposes a tree (`_grow_tree`, the runtime's draftingTopK / draftingStep /
   verifyTreeSize scheme): each level one tree call of the draft over the expanded nodes so far (mask:
   ancestors and itself, position = committed + depth - 1, input hidden = the parent's draft hidden state, ids
   mapped to the base vocabulary by d2t);
4. the base verifies root (t) + tree in one tree call (position = committed + depth, row t of the mask set
   for t and its ancestors, `context_lengths` = committed + S); greedy acceptance walks from the root along
   the child whose token is the base's argmax; the longest accepted path is committed and the next token is
   the base's argmax after it;
5. the base cache is compacted: the path's K/V move from slot committed + index to committed + i (their
   RoPE positions are already those of the new slots); the draft is fed the accepted tokens with the base's
   hidden rows of the path (chunked prefill), which overwrites its tree slots.

This decoding is lossless: the tokens are those of plain greedy decoding of the base, whatever the draft
proposes; the draft only changes how many tokens one base call commits (the accepted length).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .paged_runner import CHUNKED, DECODE, PREFILL, PagedRunner
from .plugin import PAGE_SIZE, pack_tree_mask
from .runner import BatchPagedRunner, DenseRunner

# The runtime's defaults (llm_inference --eagleDraftTopK 10 --eagleDraftStep 6 --eagleVerifyTreeSize 60).
TOP_K, DEPTH, VERIFY_SIZE = 10, 6, 60


@dataclass
class Node:
    token: int  # base vocabulary id
    parent: int  # index in the node list, -1: the root
    depth: int  # 1 under the root
    score: float  # summed draft log-probs along the path
    draft_id: int = 0


@dataclass
class SpecResult:
    tokens: list[int]
    accepted: list[int] = field(default_factory=list)  # tokens committed per base call (path incl. root)
    rows: list[np.ndarray] = field(default_factory=list)  # the base's logits row that chose each token

    @property
    def mean_accepted(self) -> float:
        return float(np.mean(self.accepted)) if self.accepted else 0.0


def ancestors_mask(parents: list[int]) -> np.ndarray:
    """[S, S] booleans: token t may attend to j when j is t or an ancestor (parents index earlier tokens)."""
    s = len(parents)
    allowed = np.zeros((s, s), dtype=bool)
    for t in range(s):
        j = t
        while j >= 0:
            allowed[t, j] = True
            j = parents[j]
    return allowed


class TreeRunner(DenseRunner):
    """DenseRunner calls with the EAGLE3 inputs: any selected rows, the tree mask and positions, extra inputs;
    returns (logits [S_sel, V], hidden_states rows)."""

    mask_bit_order = staticmethod(pack_tree_mask)  # tests swap it to show a wrong bit order fails

    def call(self, ids, context_length: int, start: int | None, select, tree=None, extra=None):
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        s = ids.shape[1]
        if tree is None:  # not a tree step: positions [B, 1] ask for the plain modes
            pos, mask = np.zeros((1, 1), np.int32), np.zeros((1, 1, 1), np.int32)
        else:
            positions, allowed = tree
            pos = np.asarray(positions, dtype=np.int32).reshape(1, s)
            mask = self.mask_bit_order(allowed)[None]
        feeds = {
            "inputs_embeds": self.s.embed(ids),
            "context_lengths": np.array([context_length], np.int32),
            "rope_rotary_cos_sin": self.s.rope_table[None],
            "kvcache_start_index": (np.zeros((0,), np.int32) if start is None else np.array([start], np.int32)),
            "last_token_ids": np.asarray(select, dtype=np.int64).reshape(1, -1),
            "attention_mask": mask, "attention_pos_id": pos,
            **self.cache_feeds(np.array([(0 if start is None else start) + s])), **(extra or {}),
        }
        out = self.s.run(feeds)
        self.keep(out)
        return np.asarray(out["logits"], np.float32)[0], np.asarray(out["hidden_states"])[0]

    def compact(self, committed: int, path: list[int]) -> None:
        """Move the accepted tokens' K/V (call slots committed + path[i]) to committed + i, in order."""
        for c in self.cache:
            for i, p in enumerate(path):
                if p != i:
                    c[:, :, :, committed + i] = c[:, :, :, committed + p]


class TokenTreeRunner(PagedRunner):
    """TreeRunner's calls on an edgellm-0.11 folder (one sequence, token-major, paged pool), with the tree inputs
    as contract part 3 §18.3 infers them: physical query width = the call's tokens, a plain call gets causal bits
    and positions past + i (the same attention), `attention_sequence_lengths` = committed + width."""

    mask_bit_order = staticmethod(pack_tree_mask)

    def call(self, ids, context_length: int, start: int | None, select, tree=None, extra=None):
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        s = ids.shape[0]
        past = 0 if start is None else int(start)
        if tree is None:
            positions, allowed = past + np.arange(s), np.tril(np.ones((s, s), dtype=bool))
        else:
            positions, allowed = tree
        positions = np.asarray(positions, dtype=np.int64)
        if past + s > self.pages_per_seq * PAGE_SIZE:
            raise ValueError(f"sequence longer than the runner's capacity of {self.pages_per_seq * PAGE_SIZE} tokens")
        phase = DECODE if s == 1 else PREFILL if past == 0 else CHUNKED
        feeds = {
            "inputs_embeds": self.s.embed(ids),
            "rope_rotary_cos_sin": self.s.rope_rows(0, np.maximum(positions, 0)),
            "positions": np.maximum(positions, 0).astype(np.int32),
            "query_start_offsets": np.array([0, s], np.int32),
            "query_lengths": np.array([s], np.int32),
            "past_lengths": np.array([past], np.int32),
            "attention_sequence_lengths": np.array([past + s], np.int32),
            "state_indices": np.zeros(1, np.int32),
            "execution_phase_marker": np.zeros(phase, np.int32),
            "context_sequence_count_carrier": np.zeros(0 if phase == DECODE else 1, np.int32),
            "kv_page_table": self.page_table(np.array([past + s])),
            "logits_indices": np.asarray(select, dtype=np.int64).reshape(-1),
            "packed_attention_mask": self.mask_bit_order(allowed),
            "attention_position_ids": positions.astype(np.int32),
            "tree_parent_ids": np.zeros(s, np.int32), "tree_depths": np.zeros(s, np.int32),
            "valid_tree_counts": np.ones(1, np.int32),
            **{f"past_key_values_{i}": p for i, p in enumerate(self.pools)},
            **{k: np.asarray(v)[0] for k, v in (extra or {}).items()},  # [1, S, X] -> token-major [S, X]
        }
        out = self.s.run(feeds)
        self.pools = [out[f"present_key_values_{i}"] for i in range(len(self.pools))]
        return np.asarray(out["logits"], np.float32), np.asarray(out["hidden_states"])

    def compact(self, committed: int, path: list[int]) -> None:
        compact_pools(self, committed, path)


def compact_pools(runner, committed: int, path: list[int]) -> None:
    """compact() over paged pools [2, num_pages, 128, Hkv, D] (sequence 0; V page = K page + num_pages)."""
    for pool in runner.pools:
        flat = pool.reshape(2 * runner.num_pages, PAGE_SIZE, *pool.shape[3:])
        for i, p in enumerate(path):
            if p == i:
                continue
            src, dst = committed + p, committed + i
            for kv in range(2):
                off = kv * runner.num_pages
                flat[runner.pages[0, dst // PAGE_SIZE] + off, dst % PAGE_SIZE] = \
                    flat[runner.pages[0, src // PAGE_SIZE] + off, src % PAGE_SIZE]


class BatchPagedTreeRunner(TreeRunner, BatchPagedRunner):
    """TreeRunner's calls on an edgellm-0.10 folder (batch-major, paged pool and kv_page_table)."""

    def compact(self, committed: int, path: list[int]) -> None:
        compact_pools(self, committed, path)


def tree_runner(session, capacity: int):
    """The runner of `session`'s target: dense batch-major (0.5, 0.9) or token-major paged (0.11)."""
    if "kv_page_table" in session.inputs:
        if "kvcache_start_index" in session.inputs:
            return BatchPagedTreeRunner(session, 1, capacity)
        return TokenTreeRunner(session, 1, capacity)
    return TreeRunner(session, 1, capacity)


def speculative_greedy(base, draft, d2t: np.ndarray, prompt: list[int], new_tokens: int, *, top_k: int = TOP_K,
                       depth: int = DEPTH, verify_size: int = VERIFY_SIZE, positions_offset: int = 0) -> SpecResult:
    """Greedy speculative decoding of `new_tokens` tokens after `prompt` (see the module docstring). `base` and
    `draft` are reference Sessions (the draft's with the base's embedding); `positions_offset` shifts the tree
    positions (tests: an off-by-one must fail)."""
    n = len(prompt)
    cap = n + new_tokens + max(verify_size, top_k * depth) + 8
    b, d = tree_runner(base, cap), tree_runner(draft, cap)
    h = int(draft.config["hidden_size"])
    fdt = draft.float
    logits, hid = b.call(prompt, n, None, np.arange(n))
    result = SpecResult(tokens=[int(np.argmax(logits[-1]))], rows=[logits[-1]])
    hidden_input = hid[None]
    dl, dh = d.call(list(prompt[1:]) + [result.tokens[0]], n, None, [n - 1],
                    extra={"hidden_states_input": hidden_input.astype(fdt),
                           "hidden_states_from_draft": np.zeros((1, n, h), fdt)})
    root_logp, root_h = dl[0], dh[0]
    committed = n  # tokens in both caches (the base's and the draft's), the root not among them
    while len(result.tokens) < new_tokens:
        root = result.tokens[-1]
        nodes = _grow_tree(d, d2t, root_logp, root_h, committed, top_k, depth, h, fdt, positions_offset,
                           verify_size)
        # base verification: root + nodes
        parents = [-1] + [nd.parent + 1 for nd in nodes]
        tokens = [root] + [nd.token for nd in nodes]
        pos = [committed + positions_offset] + [committed + nd.depth + positions_offset for nd in nodes]
        s = len(tokens)
        logits, hid = b.call(tokens, committed + s, committed, np.arange(s), tree=(pos, ancestors_mask(parents)))
        path = [0]
        while True:
            want = int(np.argmax(logits[path[-1]]))
            child = next((i for i in range(1, s) if parents[i] == path[-1] and tokens[i] == want), None)
            if child is None:
                break
            result.rows.append(logits[path[-1]])
            path.append(child)
        result.rows.append(logits[path[-1]])
        bonus = int(np.argmax(logits[path[-1]]))
        b.compact(committed, path)
        result.tokens += [tokens[i] for i in path[1:]] + [bonus]
        result.accepted.append(len(path))
        # the draft catches up: rows committed..committed+len(path)-1 get tokens path[1:] + bonus, base hidden of path
        m = len(path)
        ctx = m if m > 1 else committed + 1  # chunked prefill counts this call's tokens; decode the total
        dl, dh = d.call([tokens[i] for i in path[1:]] + [bonus], ctx, committed, [m - 1],
                        extra={"hidden_states_input": hid[path][None].astype(fdt),
                               "hidden_states_from_draft": np.zeros((1, m, h), fdt)})
        root_logp, root_h = dl[0], dh[0]
        committed += m
    result.tokens = result.tokens[:new_tokens]
    result.rows = result.rows[:new_tokens]
    return result


def _grow_tree(d: TreeRunner, d2t, root_logp, root_h, committed: int, top_k: int, depth: int, h: int, fdt,
               positions_offset: int, verify_size: int) -> list[Node]:
    """The draft's proposal tree, as the runtime drafts it (draftingTopK = top_k, draftingStep = depth,
    verifyTreeSize = verify_size): level 1 is the root's top_k tokens; each further level expands the top_k
    best nodes of the previous level (by summed log-prob) into top_k children each (top_k² candidates), one
    draft tree call over the expanded nodes so far per level; the tree the base verifies is the verify_size best
    candidates of the whole table (with their ancestors), parents before children."""

    def children(logp, parent: int, score: float, level: int) -> list[Node]:
        best = np.argsort(-logp, kind="stable")[:top_k]
        return [Node(int(i + d2t[i]), parent, level, score + float(logp[i]), int(i)) for i in best]

    table = children(root_logp, -1, 0.0, 1)
    expanded = list(range(len(table)))  # level 1: every node is expanded
    hidden = {}  # table index -> its draft hidden state
    for level in range(1, depth):
        s = len(expanded)
        where = {t: j for j, t in enumerate(expanded)}
        parents = [where.get(table[t].parent, -1) for t in expanded]
        from_draft = np.stack([root_h if table[t].parent < 0 else hidden[table[t].parent] for t in expanded])
        pos = [committed + table[t].depth - 1 + positions_offset for t in expanded]
        frontier = [j for j, t in enumerate(expanded) if table[t].depth == level]
        dl, dh = d.call([table[t].token for t in expanded], committed + s, committed, frontier,
                        tree=(pos, ancestors_mask(parents)),
                        extra={"hidden_states_input": np.zeros((1, s, d.s.config["base_model_hidden_size"]), fdt),
                               "hidden_states_from_draft": from_draft[None].astype(fdt)})
        candidates = []
        for j, f in enumerate(frontier):
            t = expanded[f]
            hidden[t] = dh[j]
            candidates += children(dl[j], t, table[t].score, level + 1)
        first = len(table)
        table += candidates
        best = sorted(range(first, len(table)), key=lambda i: -table[i].score)[:top_k]
        expanded += sorted(best)
    # the verify tree: the best verify_size of the table, closed under ancestors
    keep = set()
    for i in sorted(range(len(table)), key=lambda i: -table[i].score)[:verify_size]:
        while i >= 0 and i not in keep:
            keep.add(i)
            i = table[i].parent
    order = sorted(keep, key=lambda i: (table[i].depth, i))
    index = {t: j for j, t in enumerate(order)}
    return [Node(table[t].token, index.get(table[t].parent, -1), table[t].depth, table[t].score, table[t].draft_id)
            for t in order]
