"""The EAGLE3 draft module (hf/eagle3_draft.py) against the checkpoint format, computed by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from onnx_rewriter.errors import RewriteError
from onnx_rewriter.hf import eagle3_draft


@pytest.fixture(scope="module")
def draft(models, tmp_path_factory):
    base = models.checkpoint("llama", num_hidden_layers=4)
    out = eagle3_draft.build_tiny_draft(base, tmp_path_factory.mktemp("draft"), seed=3, target_layer_ids=[0, 2, 3])
    return base, out


def _rms(x, w, eps):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, theta, d):
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    f = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([f.cos(), f.cos()], -1), torch.cat([f.sin(), f.sin()], -1)
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def test_checkpoint_format(draft):
    _, out = draft
    cfg = json.loads((out / "config.json").read_text())
    assert eagle3_draft.is_eagle3_config(cfg) and eagle3_draft.target_layer_ids(cfg) == [0, 2, 3]
    st = load_file(str(out / "model.safetensors"))
    h, vd, v = cfg["hidden_size"], cfg["draft_vocab_size"], cfg["vocab_size"]
    assert st["midlayer.self_attn.q_proj.weight"].shape[1] == 2 * h
    assert st["fc.weight"].shape == (h, 3 * h) and st["lm_head.weight"].shape == (vd, h)
    assert st["d2t"].dtype == torch.int64 and st["t2d"].dtype == torch.bool and "embed_tokens.weight" not in st
    target = np.arange(vd) + st["d2t"].numpy()
    assert np.all(np.diff(target) > 0) and target.max() < v
    assert np.array_equal(np.flatnonzero(st["t2d"].numpy()), target)


def test_forward_matches_hand_computation(draft):
    base, out = draft
    from transformers import AutoModelForCausalLM

    emb = AutoModelForCausalLM.from_pretrained(base).get_input_embeddings().weight.detach()
    model = eagle3_draft.load_draft(out, base_embedding=emb)
    cfg = json.loads((out / "config.json").read_text())
    st = load_file(str(out / "model.safetensors"))
    h, hq, hkv, d = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps, theta = cfg["rms_norm_eps"], cfg["rope_parameters"]["rope_theta"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg["vocab_size"], (1, 5), generator=g)
    taps = torch.randn(1, 5, 3 * h, generator=g)
    prev = torch.randn(1, 5, h, generator=g)
    with torch.no_grad():
        logits, hidden = model(ids, torch.ones_like(ids), taps, prev)

        w = {k.removeprefix("midlayer."): v.float() for k, v in st.items()}
        x_emb = emb[ids[0]]
        hh = prev[0] + taps[0] @ w["fc.weight"].T
        x = torch.cat([_rms(x_emb, w["input_layernorm.weight"], eps), _rms(hh, w["hidden_norm.weight"], eps)], -1)
        pos = torch.arange(5)
        q = (x @ w["self_attn.q_proj.weight"].T).view(5, hq, d).transpose(0, 1)
        k = (x @ w["self_attn.k_proj.weight"].T).view(5, hkv, d).transpose(0, 1)
        vv = (x @ w["self_attn.v_proj.weight"].T).view(5, hkv, d).transpose(0, 1)
        q, k = _rope(q, pos, theta, d), _rope(k, pos, theta, d)
        k, vv = k.repeat_interleave(hq // hkv, 0), vv.repeat_interleave(hq // hkv, 0)
        s = q @ k.transpose(-1, -2) / d ** 0.5 + torch.triu(torch.full((5, 5), -torch.inf), 1)
        a = (s.softmax(-1) @ vv).transpose(0, 1).reshape(5, hq * d)
        hh = hh + a @ w["self_attn.o_proj.weight"].T
        y = _rms(hh, w["post_attention_layernorm.weight"], eps)
        m = (torch.nn.functional.silu(y @ w["mlp.gate_proj.weight"].T) * (y @ w["mlp.up_proj.weight"].T))
        hh = hh + m @ w["mlp.down_proj.weight"].T
        ref_logits = _rms(hh, w["norm.weight"], eps) @ w["lm_head.weight"].T
    torch.testing.assert_close(hidden[0], hh, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[0], ref_logits, rtol=1e-4, atol=1e-4)


def test_refusals(draft, tmp_path):
    base, out = draft
    with pytest.raises(RewriteError, match="embed_tokens"):
        eagle3_draft.load_draft(out)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(RewriteError, match="not an EAGLE3 draft"):
        eagle3_draft.read_draft_config(tmp_path)
