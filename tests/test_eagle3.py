"""EAGLE3 (features/eagle3.py, reference/eagle.py, verification/eagle3.py): a tiny random base and draft exported
as a pair, the folders' contract, lossless speculative decoding against transformers, and three deliberate bugs
(tree-mask bit order, hidden-state layers, attention_pos_id off by one) that verify must catch.

Default: one Llama pair on edgellm-0.9 and one on edgellm-0.11 (export ~15 s, verify ~9 s each) and short verifies
for the bugs; edgellm-0.10 (Llama, Qwen3), Qwen3 on 0.9 / 0.5 and Llama on 0.5 behind --runslow."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import onnx_rewriter
from onnx_rewriter.errors import RewriteError, UnsupportedModel
from onnx_rewriter.hf import eagle3_draft
from onnx_rewriter.reference import eagle as ref_eagle
from onnx_rewriter.reference.plugin import pack_tree_mask
from onnx_rewriter.verification.eagle3 import verify_eagle3

LAYERS = [0, 2, 3]  # what the tiny draft says it was trained on (4-layer base)


def _pair(models, tmp_path_factory, family: str, target: str):
    base = models.checkpoint(family, num_hidden_layers=4)
    root = tmp_path_factory.mktemp(f"eagle_{family}_{target}")
    draft = eagle3_draft.build_tiny_draft(base, root / "draft_ckpt", seed=1, target_layer_ids=LAYERS)
    onnx_rewriter.export(model=str(base), output_dir=root / "out", target=target, eagle_draft=str(draft),
                         keep_baseline=str(root / "baseline"))
    return base, draft, root


TREE_INPUTS = {"edgellm-0.9": (7, ["attention_mask", "attention_pos_id"]),
               "edgellm-0.10": (6, ["attention_mask", "attention_pos_id"]),  # after the 6 plain inputs
               "edgellm-0.11": (6, ["packed_attention_mask", "attention_position_ids"])}


@pytest.fixture(scope="module", params=["edgellm-0.9", "edgellm-0.11",
                                        pytest.param("edgellm-0.10", marks=pytest.mark.slow)])
def llama(models, tmp_path_factory, request):
    return _pair(models, tmp_path_factory, "llama", request.param) + (request.param,)


def _io(path):
    g = onnx.load(str(path), load_external_data=False).graph
    return [i.name for i in g.input], [o.name for o in g.output], [n for n in g.node if n.op_type == "AttentionPlugin"]


def test_pair_contract(llama):
    _, _, root, target = llama
    base_cfg = json.loads((root / "out/base/config.json").read_text())
    assert base_cfg["eagle_hidden_state_layers"] == LAYERS  # the draft's target_layer_ids
    assert (base_cfg["spec_decode_type"], base_cfg["engine_role"]) == ("eagle3", "base")
    assert base_cfg["model_type"] == ("eagle3_base" if target == "edgellm-0.9" else "llm")
    assert base_cfg["edgellm_version"].startswith(target.removeprefix("edgellm-"))
    ins, outs, plugins = _io(root / "out/base/model.onnx")
    assert outs[:2] == ["logits", "hidden_states"] and outs[2].startswith("present_key_values_")
    at, names = TREE_INPUTS[target]
    assert set(names) <= set(ins)
    for p in plugins:  # 0.9: the tree mask at 7, positions at 8; 0.11: at 6 and 7
        assert list(p.input[at:at + 2]) == names
        assert onnx.helper.get_attribute_value(next(a for a in p.attribute if a.name == "enable_tree_attention")) == 1
    d_cfg = json.loads((root / "out/draft/config.json").read_text())
    assert (d_cfg["engine_role"], d_cfg["draft_vocab_size"], d_cfg["base_model_hidden_size"]) == (
        "draft", base_cfg["vocab_size"] // 2, 3 * base_cfg["hidden_size"])
    files = sorted(p.name for p in (root / "out/draft").iterdir())
    assert "embedding.safetensors" not in files and "tokenizer.json" not in files and "d2t.safetensors" in files
    ins, outs, _ = _io(root / "out/draft/model.onnx")
    assert {"hidden_states_input", "hidden_states_from_draft"} <= set(ins) and outs[:2] == ["logits", "hidden_states"]
    g = onnx.load(str(root / "out/draft/model.onnx"), load_external_data=False).graph
    assert any(n.op_type == "LogSoftmax" for n in g.node)


def test_pair_verifies(llama, capsys):
    base, draft, root, _ = llama
    result = verify_eagle3(root / "out", str(base), str(draft))
    out = capsys.readouterr().out
    assert result.passed, out
    assert "mean accepted length" in out and len(result.mean_accepted) == 2


def test_multi_token_acceptance_is_lossless(llama, monkeypatch, capsys):
    """The random draft rarely proposes the base's token; a proposer that puts the true continuation (with
    distractor siblings) into the tree exercises acceptance of long paths and the cache compaction."""
    base, draft, root, _ = llama
    from transformers import AutoModelForCausalLM

    from onnx_rewriter.reference.runner import Session
    from onnx_rewriter.verification.eagle3 import _greedy

    hf = AutoModelForCausalLM.from_pretrained(base).eval()
    prompt = [11, 57, 203, 9, 140]
    truth, _ = _greedy(hf, prompt, 24)
    n = len(prompt)

    def oracle_tree(d, d2t, root_logp, root_h, committed, top_k, depth, h, fdt, off, verify_size):
        done = committed - n + 1  # tokens already produced (the root is the last of them)
        nodes, parent = [], -1
        for level in range(1, depth + 1):
            k = done + level - 1
            if k >= len(truth):
                break
            nodes.append(ref_eagle.Node(truth[k], parent, level, 0.0))
            nodes.append(ref_eagle.Node((truth[k] + 1) % 300, parent, level, -1.0))  # a wrong sibling
            parent = len(nodes) - 2
        return nodes

    monkeypatch.setattr(ref_eagle, "_grow_tree", oracle_tree)
    b = Session(root / "out/base")
    d = Session(root / "out/draft", embedding=b.embedding)
    from safetensors.numpy import load_file

    d2t = load_file(str(root / "out/draft/d2t.safetensors"))["d2t"].astype(np.int64)
    spec = ref_eagle.speculative_greedy(b, d, d2t, prompt, 24, depth=4)
    assert spec.tokens == truth
    assert spec.mean_accepted > 3.0, spec.accepted


def _short(root, base, draft, **kw):
    return verify_eagle3(root / "out", str(base), str(draft), new_tokens=8, prompts=[[11, 57, 203, 9, 140, 7]],
                         quiet=True, **kw)


def test_wrong_bit_order_fails(llama, monkeypatch):
    base, draft, root, _ = llama

    def msb_first(allowed):
        return pack_tree_mask(np.asarray(allowed)[..., ::-1])  # token j as bit (S - 1 - j)

    for runner in (ref_eagle.TreeRunner, ref_eagle.TokenTreeRunner):
        monkeypatch.setattr(runner, "mask_bit_order", staticmethod(msb_first))
    assert not _short(root, base, draft).passed


def test_off_by_one_positions_fail(llama):
    base, draft, root, _ = llama
    assert not _short(root, base, draft, positions_offset=1).passed


def test_wrong_hidden_layers_fail(llama, tmp_path, monkeypatch):
    """A base whose taps are not the layers its config names (the tap of layer i + 1 for i), and one tapping
    other layers than the draft was trained on: both fail."""
    base, draft, root, target = llama
    from onnx_rewriter.features import eagle3 as feature

    real = feature.residual_into

    def shifted(layer, norms):
        by_index = {l.index: l for l in shifted.layers}
        return real(by_index.get(layer.index + 1, layer), norms)

    orig_check = feature.Eagle3._check_base

    def check_base(self, run):
        shifted.layers = run.layers
        orig_check(self, run)

    monkeypatch.setattr(feature, "residual_into", shifted)
    monkeypatch.setattr(feature.Eagle3, "_check_base", check_base)
    out = tmp_path / "bad"
    (out / "base").parent.mkdir(exist_ok=True)
    onnx_rewriter.rewrite(root / "baseline/model.onnx", out / "base", eagle_base=True, eagle_layers=LAYERS,
                          target=target)
    monkeypatch.undo()
    import shutil

    shutil.copytree(root / "out/draft", out / "draft")
    assert not verify_eagle3(out, str(base), str(draft), new_tokens=4, quiet=True).passed

    other = tmp_path / "other"
    other.mkdir()
    onnx_rewriter.rewrite(root / "baseline/model.onnx", other / "base", eagle_base=True, eagle_layers=[1, 2, 3],
                          target=target)
    shutil.copytree(root / "out/draft", other / "draft")
    r = verify_eagle3(other, str(base), str(draft), new_tokens=4, quiet=True)
    assert not r.passed and any("trained on" in p for p in r.problems)


def test_qk_norm_base_on_011_puts_the_tree_after_the_gammas(models, tmp_path):
    """Qwen3 on 0.11: the plugin's 6 required inputs, the q/k-norm gammas, then the tree mask and positions (the
    order of NVIDIA's 0.11.0 exporter); the pair verifies in the slow test_other_pairs_verify."""
    onnx_rewriter.rewrite(models.baseline("qwen3"), tmp_path / "b", eagle_base=True, eagle_layers="0,1,1",
                          target="edgellm-0.11")
    g = onnx.load(str(tmp_path / "b/model.onnx"), load_external_data=False).graph
    consts = {t.name for t in g.initializer}
    for p in (n for n in g.node if n.op_type == "AttentionPlugin"):
        assert len(p.input) == 14 and set(p.input[6:8]) <= consts
        assert list(p.input[8:10]) == ["packed_attention_mask", "attention_position_ids"]


def test_refusals(models, tmp_path):
    src = models.baseline("llama")  # 2 layers
    with pytest.raises(UnsupportedModel, match="layer 2 of"):
        onnx_rewriter.rewrite(src, tmp_path / "c", eagle_base=True, eagle_layers="0,1,2")
    with pytest.raises(UnsupportedModel, match="layer 2 of"):  # the default [2, L//2, L-4] does not fit 2 layers
        onnx_rewriter.rewrite(src, tmp_path / "g", eagle_base=True)
    with pytest.raises(RewriteError, match="--eagle-layers needs --eagle-base"):
        onnx_rewriter.rewrite(src, tmp_path / "d", eagle_layers="0,1,2")
    with pytest.raises(RewriteError, match="either the base or the draft"):
        onnx_rewriter.rewrite(src, tmp_path / "a", eagle_base=True, eagle_draft=True)
    with pytest.raises(RewriteError, match="--dtype float16"):
        onnx_rewriter.rewrite(src, tmp_path / "e", eagle_base=True, dtype="float32")
    with pytest.raises(RewriteError, match="no 'hidden_states_input'"):
        onnx_rewriter.rewrite(src, tmp_path / "f", eagle_draft=True)
    with pytest.raises(RewriteError, match="a folder is for export"):
        onnx_rewriter.rewrite(src, tmp_path / "h", eagle_draft=str(tmp_path))
    assert not any((tmp_path / x).exists() for x in "abcdefgh")
    base = models.checkpoint("llama")
    draft = eagle3_draft.build_tiny_draft(base, tmp_path / "draft")
    with pytest.raises(RewriteError, match="inside the --eagle-draft checkpoint"):
        onnx_rewriter.export(model=str(base), output_dir=draft / "out", eagle_draft=str(draft))
    assert not (draft / "out").exists()


def test_narrow_draft_refused(models, tmp_path):
    """A draft narrower than its base: 0.5 / 0.9 builders size hidden_states_input as 3 x the draft's own hidden
    size; on 0.10 / 0.11 such a draft has its own token embedding, which a draft folder does not carry. Refused
    by name on each, nothing written."""
    base = models.checkpoint("llama", num_hidden_layers=4)
    d = eagle3_draft.build_tiny_draft(base, tmp_path / "narrow", with_embedding=True, hidden_size=32, head_dim=8,
                                      intermediate_size=64)
    (tmp_path / "dx").mkdir()
    eagle3_draft.export_draft_baseline(eagle3_draft.load_draft(d), tmp_path / "dx" / "model.onnx")
    (tmp_path / "dx" / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(UnsupportedModel, match="target_hidden_size 64 != hidden_size 32"):
        onnx_rewriter.rewrite(tmp_path / "dx" / "model.onnx", tmp_path / "o9", eagle_draft=True)
    with pytest.raises(UnsupportedModel, match="own token embedding"):
        onnx_rewriter.rewrite(tmp_path / "dx" / "model.onnx", tmp_path / "o11", eagle_draft=True,
                              target="edgellm-0.11")
    assert not (tmp_path / "o9").exists() and not (tmp_path / "o11").exists()


@pytest.mark.slow
@pytest.mark.parametrize("family,target", [("qwen3", "edgellm-0.9"), ("llama", "edgellm-0.5"),
                                           ("qwen3", "edgellm-0.5"), ("qwen3", "edgellm-0.10"),
                                           ("qwen3", "edgellm-0.11")])
def test_other_pairs_verify(models, tmp_path_factory, family, target):
    base, draft, root = _pair(models, tmp_path_factory, family, target)
    assert verify_eagle3(root / "out", str(base), str(draft), quiet=True).passed
