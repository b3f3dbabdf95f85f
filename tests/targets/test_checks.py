"""Capability checks run before anything is written: refusals for what no target can express, warnings
for what the runtime may not build."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from onnx_rewriter import targets
from onnx_rewriter.errors import RewriteError, UnsupportedModel
from onnx_rewriter.matching.results import AttentionLayer, QKNorm, RopeTable


def _layers(n=2, **kw):
    table = RopeTable(inv_freq=np.ones(8), positions=None, cos=None, sin=None)
    base = AttentionLayer(index=0, q=None, k=None, v=None, out=None, num_q_heads=4, num_kv_heads=2, head_size=64,
                          rotary_dim=64, rope=table, scale=0.125, mask=None)
    return [replace(base, index=i, **kw) for i in range(n)]


def _check(target, layers):
    warnings = []
    targets.get(target).check(layers, warnings.append)
    return warnings


@pytest.mark.parametrize("target", sorted(targets.TARGETS))
def test_supported_layers_pass_quietly(target):
    assert _check(target, _layers()) == []
    assert _check(target, _layers(sliding_window=4096, scale=0.3)) == []  # window and a non-default scale


@pytest.mark.parametrize("target", sorted(targets.TARGETS))
def test_refusals(target):
    with pytest.raises(UnsupportedModel, match="even rotary width"):
        _check(target, _layers(rotary_dim=63))
    with pytest.raises(UnsupportedModel, match="attention scale"):
        _check(target, _layers(scale=float("nan")))
    with pytest.raises(UnsupportedModel, match="uniform heads"):
        _check(target, _layers()[:1] + _layers(num_kv_heads=4)[1:])


def test_window_refused_where_a_target_has_none(monkeypatch):
    t = targets.get("edgellm-0.5")
    monkeypatch.setattr(t, "supports_sliding_window", False)
    with pytest.raises(UnsupportedModel, match="sliding window of 8 tokens"):
        _check("edgellm-0.5", _layers(sliding_window=8))


def test_warnings():
    assert any("head size 48" in w for w in _check("edgellm-0.9", _layers(head_size=48, rotary_dim=48)))
    assert any("16 q heads per kv head" in w for w in _check("edgellm-0.11", _layers(num_q_heads=32)))
    w = QKNorm(weight=np.ones(64), eps=1e-6, x=None)
    assert any("only one of q and k" in m for m in _check("edgellm-0.11", _layers(q_norm=w)))
    assert _check("edgellm-0.9", _layers(q_norm=w)) == []  # the norm stays in the graph there anyway
    assert any("only one of q and k" in m for m in _check("edgellm-0.10", _layers(q_norm=w)))
    big = QKNorm(weight=np.ones(512), eps=1e-6, x=None)
    wide = _check("edgellm-0.10", _layers(head_size=512, rotary_dim=64, q_norm=big, k_norm=big))
    assert any("head size 512 > 256: the 0.10 plugin cannot normalize q/k" in m for m in wide)


def test_unknown_target():
    with pytest.raises(RewriteError, match="edgellm-0.11, edgellm-0.5, edgellm-0.9"):
        targets.get("edgellm-1.0")
