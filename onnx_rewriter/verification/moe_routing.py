"""MoE verify: routing near-ties.

Top-k routing is discontinuous: where the model's k-th and (k+1)-th router logits are closer than the fp16 /
INT4 noise of everything before the router, the folder and the twin pick different experts and their logits
part by far more than any tolerance, though neither is wrong. With random routers of E = 128 and k = 8 such
ties are common (tiny bf16 Qwen3-MoE, INT4 on 0.11: gaps of ~1e-3 logits, 1 or 2 tokens per verify).

`RoutingFollower` makes the twin take the folder's expert set at such a token, and only there. The folder's
set is the top-k of its own router logits (recorded by reference/moe.py); where those are within ε of the
twin's, every expert the folder took and the twin dropped is at most 2ε below the twin's k-th, i.e. a tie up
to the noise. The rule: ε <= ROUTER_NOISE x max(1, max |logit|) at that token. Then the twin uses the folder's
experts, weighted by its own probabilities; above it the router itself is wrong, the twin keeps its experts and
verify fails naming the layer and position. Following cannot hide an error after the router (weights, the
experts' math, the combine): those logits are still compared at fp16 tolerance.
"""

from __future__ import annotations

import re

import numpy as np

from onnx_rewriter.reference import moe as moe_reference

# Largest router-logit difference a near-tie may be explained by, relative to the token's largest |logit| (at
# least 1): the contract's router is an fp16 GEMM (rounding ~5e-4) fed fp16 hidden states; the tiny bf16
# Qwen3-MoE with INT4 attention measured <= 2.4e-3. A router really wrong (transposed, quantized) is far above.
ROUTER_NOISE = 2e-2


def _layer(node: str) -> int | None:
    m = re.search(r"layers\.(\d+)/", node)
    return int(m.group(1)) if m else None


class RoutingFollower:
    """Wraps the verify oracle (an HF model with top-k router modules `mlp.gate`); `collect` after each
    runner call, then call it like the oracle."""

    def __init__(self, oracle, hf_model):
        self.oracle, self.seq = oracle, None
        self.folder: dict = {}  # (layer, token prefix) -> the folder's router logits at its last token [E]
        self.followed: dict = {}  # (layer, token prefix) -> (gap, eps) of the near-ties the twin followed
        self.errors: dict = {}  # (layer, token prefix) -> why the folder's routing is not a near-tie
        self._hooks = [gate.register_forward_hook(self._hook(i)) for i, gate in _routers(hf_model)]
        moe_reference.ROUTER_LOG = []

    def __getattr__(self, name):
        return getattr(self.oracle, name)

    def __call__(self, seq: list[int]) -> np.ndarray:
        self.seq = list(seq)
        try:
            return self.oracle(seq)
        finally:
            self.seq = None

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        moe_reference.ROUTER_LOG = None

    def collect(self, seqs: list[list[int]], new: list[int]) -> None:
        """After a runner call that appended the last `new[b]` tokens of `seqs[b]` (prefill: all of them):
        the router logits the reference recorded, keyed by each token's prefix. Rows are packed (0.11) or
        right-padded to the longest (earlier targets); equal lengths read the same either way."""
        log, moe_reference.ROUTER_LOG = moe_reference.ROUTER_LOG, []
        for node, logits in log:
            logits = np.asarray(logits, dtype=np.float32).reshape(-1, np.shape(logits)[-1])
            padded = len(logits) != sum(new)
            width = max(new)
            if padded and len(logits) != len(new) * width:
                raise ValueError(f"{node}: {len(logits)} router rows for rows of {new} new tokens")
            offset = 0
            for b, (s, n) in enumerate(zip(seqs, new)):
                start = b * width if padded else offset
                offset += n
                for j in range(n):
                    p = len(s) - n + j
                    self.folder[(_layer(node), tuple(s[:p + 1]))] = logits[start + j]

    def _hook(self, layer: int):
        def hook(module, args, output):
            if self.seq is None:
                return None
            logits, scores, idx = output
            if logits.shape[0] != len(self.seq):
                return None
            return self._follow(layer, module, logits, scores, idx)
        return hook

    def _follow(self, layer, module, logits, scores, idx):
        import torch

        lt = logits.detach().float().numpy()
        probs = torch.softmax(logits.detach().float(), dim=-1)
        idx, scores = idx.clone(), scores.clone()
        k = idx.shape[-1]
        for p in range(lt.shape[0]):
            key = tuple(self.seq[:p + 1])
            lf = self.folder.get((layer, key))
            if lf is None:
                continue
            ours = set(idx[p].tolist())
            theirs = {int(e) for e in moe_reference.route(lf[None], k, renormalize=False)[0][0]}
            if theirs == ours:
                continue
            eps = float(np.abs(lf - lt[p]).max())
            gap = float(max(lt[p, list(ours - theirs)]) - min(lt[p, list(theirs - ours)]))
            if eps > ROUTER_NOISE * max(1.0, float(np.abs(lt[p]).max())):
                self.errors[(layer, key)] = (
                    f"layers.{layer} position {p}: the folder's router logits differ from the model's by {eps:.3g}, "
                    f"above the noise a near-tie allows; it routed to experts {sorted(theirs - ours)} that the model "
                    f"ranks below its top-{k} by {gap:.3g}")
                continue
            chosen = torch.tensor(sorted(theirs, key=lambda e: -float(probs[p, e])))
            w = probs[p, chosen]
            if getattr(module, "norm_topk_prob", False):
                w = w / w.sum()
            idx[p], scores[p] = chosen, w.to(scores.dtype)
            self.followed[(layer, key)] = (gap, eps)
        return logits, scores, idx

    def line(self) -> str | None:
        if not self.followed:
            return None
        gap = max(f[0] for f in self.followed.values())
        eps = max(f[1] for f in self.followed.values())
        return (f"MoE routing near-ties: at {len(self.followed)} (layer, token) the folder's experts differ from the "
                f"model's by a logit gap of at most {gap:.2g} (router logits within {eps:.2g}); the twin took the "
                f"folder's experts there")


def _routers(hf_model) -> list:
    """(layer index, router module) for each MoE layer: transformers' top-k routers (`mlp.gate` returning
    logits, weights and indices)."""
    layers = hf_model.model.layers if hasattr(hf_model, "model") else []
    return [(i, layer.mlp.gate) for i, layer in enumerate(layers)
            if hasattr(layer.mlp, "gate") and hasattr(layer.mlp.gate, "top_k")]
