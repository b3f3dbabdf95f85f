"""Tiny checkpoints: every family builds, reloads with transformers, runs, and is deterministic."""

import hashlib
import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from onnx_rewriter import demo  # noqa: E402
from onnx_rewriter.hf import tiny  # noqa: E402


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()


def test_tokenizer_is_small_deterministic_and_has_specials(tmp_path):
    a = tiny.build_tokenizer(tmp_path / "a")
    b = tiny.build_tokenizer(tmp_path / "b")
    assert _digests(a) == _digests(b)
    tok = transformers.AutoTokenizer.from_pretrained(a)
    assert 256 <= len(tok) <= 320
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", "<pad>")
    ids = tok("<|im_start|>user\nHello, world!<|im_end|>")["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(ids) == "<|im_start|>user\nHello, world!<|im_end|>"  # byte-level: lossless
    assert tok.chat_template == tiny.DEFAULT_CHAT_TEMPLATE


def test_tokenizer_without_template(tmp_path):
    tok = transformers.AutoTokenizer.from_pretrained(tiny.build_tokenizer(tmp_path, chat_template=None))
    assert not tok.chat_template


@pytest.mark.parametrize("family", sorted(tiny.FAMILIES))
def test_family_builds_loads_and_runs(family, tmp_path):
    path = tiny.build_checkpoint(family, tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.config.vocab_size >= len(tok)
    assert sum(p.numel() for p in model.parameters()) < 600_000  # stays tiny (smollm is the largest)
    ids = tok("The capital of France is Paris.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.3  # not the near-uniform output of the 0.02 default init
    # No zero bias, no unit norm: either would hide a swapped bias slice or a dropped norm scale.
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            assert (p != 0).all(), name
        elif "norm" in name and name.endswith(".weight"):
            assert (p != 1).all() and (p != 0).all(), name


def test_family_specifics(tmp_path):
    def cfg(family):
        return tiny.describe(tiny.build_checkpoint(family, tmp_path / family))

    assert cfg("llama")["tie_word_embeddings"] is False
    assert cfg("llama_tied")["tie_word_embeddings"] is True
    smol = cfg("smollm")
    assert (smol["num_attention_heads"], smol["num_key_value_heads"], smol["head_dim"]) == (9, 3, 16)
    assert cfg("llama3")["rope_parameters"]["rope_type"] == "llama3"
    assert cfg("phi3")["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert cfg("mistral")["sliding_window"] is None
    assert cfg("mistral_window")["sliding_window"] == 8
    gemma = cfg("gemma")
    assert (gemma["head_dim"], gemma["num_key_value_heads"]) == (32, 1)
    g3 = cfg("gemma3")
    assert g3["model_type"] == "gemma3_text" and g3["sliding_window"] == 8
    assert set(g3["layer_types"]) == {"sliding_attention", "full_attention"}
    assert cfg("gptj")["rotary_dim"] == 8
    qwen2 = cfg("qwen2")
    assert (qwen2["rope_parameters"]["rope_theta"], qwen2["rms_norm_eps"]) == (999100.0, 1.7e-6)  # not round
    yarn = cfg("yarn")["rope_parameters"]
    assert (yarn["rope_type"], yarn["factor"], yarn["rope_theta"]) == ("yarn", 4.0, 99100.0)


def test_checkpoint_is_deterministic_and_seeded(tmp_path):
    a = tiny.build_checkpoint("qwen3", tmp_path / "a", seed=1)
    b = tiny.build_checkpoint("qwen3", tmp_path / "b", seed=1)
    c = tiny.build_checkpoint("qwen3", tmp_path / "c", seed=2)
    assert _digests(a) == _digests(b)
    assert _digests(a)["model.safetensors"] != _digests(c)["model.safetensors"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_and_overrides(dtype, tmp_path):
    from safetensors import safe_open

    path = tiny.build_checkpoint("llama", tmp_path, dtype=dtype, num_hidden_layers=3)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {getattr(torch, dtype)}
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and cfg["dtype"] == dtype


def test_unknown_family(tmp_path):
    with pytest.raises(ValueError, match="unknown family"):
        tiny.build_checkpoint("bert", tmp_path)


def test_demo_is_idempotent(tmp_path, capsys):
    out = tmp_path / "ck"
    assert demo.main([str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    demo.main([str(out)])
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert tiny.describe(out)["model_type"] == "llama"


@pytest.mark.parametrize("family,expect", [("qwen2", ["full_attention"] * 3),
                                           ("gemma3", ["sliding_attention", "full_attention", "sliding_attention"])])
def test_layer_count_override_repeats_the_layer_types(family, expect, tmp_path):
    path = tiny.build_checkpoint(family, tmp_path, num_hidden_layers=3)
    assert json.loads((path / "config.json").read_text())["layer_types"] == expect
