"""verify's routing near-tie rule (verification/moe_routing.py), on hand-made router logits: a flip within the
router noise is followed with the twin's own weights; a router off by more is an error naming layer and position,
and the twin keeps its own experts."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from onnx_rewriter.reference import moe as moe_reference
from onnx_rewriter.verification.moe_routing import RoutingFollower

TWIN = np.array([[2.0, 1.0, 0.9995, 0.1]], dtype=np.float32)  # top-2 {0, 1}; expert 2 is 5e-4 behind expert 1


@pytest.fixture
def follower():
    f = RoutingFollower(oracle=None, hf_model=SimpleNamespace())  # no routers to hook: _follow is called directly
    yield f
    f.close()
    assert moe_reference.ROUTER_LOG is None


def _run(follower, folder_logits, renormalize=True):
    moe_reference.ROUTER_LOG.append(("/model/layers.3/mlp/experts/Int4MoePlugin", folder_logits))
    follower.collect([[7]], [1])
    follower.seq = [7]
    logits = torch.tensor(TWIN)
    probs = torch.softmax(logits, -1)
    idx = torch.tensor([[0, 1]])
    module = SimpleNamespace(norm_topk_prob=renormalize)
    _, scores, idx = follower._follow(3, module, logits, probs[:, :2] / probs[:, :2].sum(), idx)
    return probs[0], scores[0], idx[0]


def test_a_flip_within_the_router_noise_is_followed(follower):
    probs, scores, idx = _run(follower, np.array([[2.0, 0.9996, 1.0, 0.1]], dtype=np.float32))
    assert sorted(idx.tolist()) == [0, 2]
    assert torch.allclose(scores, probs[idx] / probs[idx].sum())  # the twin's own probabilities, renormalized
    assert not follower.errors and "at 1 (layer, token)" in follower.line()


def test_not_renormalized_weights_stay_plain_probabilities(follower):
    probs, scores, idx = _run(follower, np.array([[2.0, 0.9996, 1.0, 0.1]], dtype=np.float32), renormalize=False)
    assert torch.allclose(scores, probs[idx])


def test_a_router_off_by_more_than_the_noise_is_an_error(follower):
    probs, scores, idx = _run(follower, np.array([[2.0, 0.5, 1.0, 0.1]], dtype=np.float32))
    assert idx.tolist() == [0, 1] and follower.line() is None  # the twin kept its own experts
    (msg,) = follower.errors.values()
    assert "layers.3 position 0" in msg and "experts [2]" in msg and "differ from the model's by 0.5" in msg


def test_the_same_choice_is_left_alone(follower):
    _, _, idx = _run(follower, TWIN + 1e-3)
    assert idx.tolist() == [0, 1] and follower.line() is None and not follower.errors


def test_padded_and_packed_rows_map_to_their_tokens(follower):
    """Prefill of rows [5] and [6, 7, 8]: packed (0.11) is 4 router rows, right-padded (earlier targets) 6."""
    seqs = [[5], [6, 7, 8]]
    for rows, at in ((4, {(5,): 0, (6, 7): 2, (6, 7, 8): 3}), (6, {(5,): 0, (6, 7): 4, (6, 7, 8): 5})):
        logits = np.arange(rows, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
        moe_reference.ROUTER_LOG.append(("/model/layers.0/x", logits))
        follower.collect(seqs, [1, 3])
        assert {k[1]: int(v[0]) for k, v in follower.folder.items() if k[1] in at} == at
        follower.folder.clear()
