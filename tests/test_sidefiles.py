"""Side files: tokenizer files, processed chat template / chat_template.jinja, config.json."""

import json
import logging

import pytest

transformers = pytest.importorskip("transformers")

from onnx_rewriter.errors import RewriteError  # noqa: E402
from onnx_rewriter.hf import tiny  # noqa: E402
from onnx_rewriter.sidefiles import chat_template as ct  # noqa: E402
from onnx_rewriter.sidefiles import config_json as cj  # noqa: E402
from onnx_rewriter.sidefiles import tokenizer as tk  # noqa: E402

CHATML = {
    "roles": {
        "system": {"prefix": "<|im_start|>system\n", "suffix": "<|im_end|>\n"},
        "user": {"prefix": "<|im_start|>user\n", "suffix": "<|im_end|>\n"},
        "assistant": {"prefix": "<|im_start|>assistant\n", "suffix": "<|im_end|>\n"},
    },
    "generation_prompt": "<|im_start|>assistant\n",
    "generation_prompt_thinking": "<|im_start|>assistant\n<think>\n",
    "default_system_prompt": "You are a helpful assistant.",
}

# Qwen3's habits in brief: only the final assistant turn gets a think block, and
# enable_thinking=False adds an empty one to the generation prompt.
QWEN3_LIKE = (
    "{%- set ns = namespace(last=-1) %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' and loop.index0 > ns.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
# Gemma folds the system text into the first user turn and rejects non-alternating roles.
GEMMA_LIKE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sp = messages[0]['content'] + '\\n\\n' %}"
    "{% set msgs = messages[1:] %}{% else %}{% set sp = '' %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (sp if loop.first else '') + m['content'] + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
# Llama-3 style: BOS in the template, a fixed header inside the system turn that is emitted even
# without a system message.
LLAMA3_LIKE = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set sm = messages[0]['content'] %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set sm = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nToday: 1 Jan\\n' + sm + '<|eot_id|>' }}"
    "{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tiny.build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def tok(tok_dir):
    """A fresh tokenizer (tests change its template)."""
    return transformers.AutoTokenizer.from_pretrained(tok_dir)


# --- tokenizer files -----------------------------------------------------------------------------

def test_load_tokenizer(tok_dir, tmp_path):
    assert tk.load_tokenizer(tmp_path) is None
    assert tk.load_tokenizer(tok_dir).bos_token == "<s>"
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(RewriteError, match="cannot load the tokenizer"):
        tk.load_tokenizer(tmp_path)


def test_write_tokenizer_files(tok, tmp_path):
    names = tk.write_tokenizer_files(tok, tmp_path)
    assert names == ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)  # no chat_template.jinja
    stm = json.loads((tmp_path / "special_tokens_map.json").read_text())
    assert stm == {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    }
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] == tok.chat_template
    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "<|im_start|>user\nHi there<|im_end|>"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.chat_template == tok.chat_template


# --- processed_chat_template.json ----------------------------------------------------------------

def test_default_chatml(tok):
    assert ct.processed_chat_template(tok) == CHATML


def test_written_file_is_deterministic(tok, tmp_path):
    a = ct.write_processed_chat_template(tok, tmp_path / "a").read_bytes()
    b = ct.write_processed_chat_template(tok, tmp_path / "b").read_bytes()
    assert a == b and a.endswith(b"}\n")
    assert json.loads(a) == CHATML
    assert a.decode().index('"default_system_prompt"') < a.decode().index('"roles"')  # sorted keys


def test_no_template_gives_neutral_and_warns(tok, caplog):
    tok.chat_template = None
    with caplog.at_level(logging.WARNING):
        out = ct.processed_chat_template(tok)
    assert out == {
        "roles": {r: {"prefix": "", "suffix": ""} for r in ("system", "user", "assistant")},
        "generation_prompt": "",
        "default_system_prompt": "",
    }
    assert "no chat template" in caplog.text


def test_template_without_thinking_has_no_thinking_prompt(tok):
    clause = "{%- if enable_thinking is defined and enable_thinking %}{{- '<think>\\n' }}{%- endif %}"
    assert clause in tiny.DEFAULT_CHAT_TEMPLATE
    tok.chat_template = tiny.DEFAULT_CHAT_TEMPLATE.replace(clause, "")
    expected = {k: v for k, v in CHATML.items() if k != "generation_prompt_thinking"}
    assert ct.processed_chat_template(tok) == expected


def test_qwen3_like(tok):
    tok.chat_template = QWEN3_LIKE
    out = ct.processed_chat_template(tok)
    # History form: earlier assistant turns carry no think block.
    assert out["roles"]["assistant"] == {"prefix": "<|im_start|>assistant\n", "suffix": "<|im_end|>\n"}
    assert out["generation_prompt"] == "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert out["generation_prompt_thinking"] == "<|im_start|>assistant\n"
    assert out["default_system_prompt"] == ""


def test_gemma_like_folds_system_into_user(tok, caplog):
    tok.chat_template = GEMMA_LIKE
    with caplog.at_level(logging.WARNING):
        out = ct.processed_chat_template(tok)
    user = {"prefix": "<start_of_turn>user\n", "suffix": "<end_of_turn>\n"}
    assert out["roles"]["user"] == user
    assert out["roles"]["assistant"] == {"prefix": "<start_of_turn>model\n", "suffix": "<end_of_turn>\n"}
    # The tiny tokenizer does not add BOS itself, so the template's BOS is kept, once, up front.
    assert out["roles"]["system"] == {"prefix": "<s>" + user["prefix"], "suffix": user["suffix"]}
    assert out["generation_prompt"] == "<start_of_turn>model\n"
    assert "no separate system turn" in caplog.text


def test_llama3_like_header_is_not_a_default_prompt(tok):
    tok.chat_template = LLAMA3_LIKE
    out = ct.processed_chat_template(tok)
    assert out["roles"]["system"] == {
        "prefix": "<s><|start_header_id|>system<|end_header_id|>\n\nToday: 1 Jan\n", "suffix": "<|eot_id|>"}
    assert out["roles"]["user"]["prefix"] == "<|start_header_id|>user<|end_header_id|>\n\n"
    assert out["default_system_prompt"] == ""


def test_bos_dropped_when_tokenizer_adds_it(tok):
    from tokenizers.processors import TemplateProcessing

    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.bos_token_id)])
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    tok.chat_template = LLAMA3_LIKE
    assert ct.processed_chat_template(tok)["roles"]["system"]["prefix"].startswith("<|start_header_id|>")


def test_unusable_template_is_a_rewrite_error(tok):
    tok.chat_template = "{{ raise_exception('nope') }}"
    with pytest.raises(RewriteError, match="cannot reduce the chat template"):
        ct.processed_chat_template(tok)


def test_chat_template_jinja(tok, tmp_path, caplog):
    assert ct.write_chat_template_jinja(tok, tmp_path).read_text() == tiny.DEFAULT_CHAT_TEMPLATE
    tok.chat_template = None
    with caplog.at_level(logging.WARNING):
        path = ct.write_chat_template_jinja(tok, tmp_path)
    assert path.read_text() == ct.NEUTRAL_JINJA and "no chat template" in caplog.text
    tok.chat_template = ct.NEUTRAL_JINJA  # the neutral Jinja matches the neutral JSON: plain concatenation
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == "ab"


# --- config.json ---------------------------------------------------------------------------------

SPEC = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rotary_dim=16, rope_theta=10000.0)


def _hf(**kw):
    base = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=256,
                rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    base.update(kw)
    return base


def test_config_json_default_rope():
    cfg = cj.make_config_json(SPEC, _hf(), "0.9.0")
    assert cfg == {
        "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
        "rope_theta": 10000.0, "rope_scaling": None, "partial_rotary_factor": 1.0, "rms_norm_eps": 1e-5,
        "model_type": "llm", "edgellm_version": "0.9.0", "kv_cache_dtype": "fp16",
    }


def test_config_json_llama3_rope_parameters():
    rp = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = cj.make_config_json(dict(SPEC, rope_theta=500000.0), _hf(rope_parameters=rp), "0.9.0")
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert cfg["rope_theta"] == 500000.0
    # transformers-4 layout gives the same
    old = _hf(rope_theta=500000.0, rope_scaling={k: v for k, v in rp.items() if k != "rope_theta"})
    del old["rope_parameters"]
    assert cj.make_config_json(dict(SPEC, rope_theta=500000.0), old, "0.9.0") == cfg


def test_config_json_longrope_names_original_context_at_top_level():
    # The runtime computes longrope itself and reads original_max_position_embeddings at the top level.
    rp = {"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": [1.0] * 8, "short_factor": [1.0] * 8,
          "original_max_position_embeddings": 64}
    cfg = cj.make_config_json(SPEC, _hf(rope_parameters=rp), "0.9.0")
    assert cfg["original_max_position_embeddings"] == 64
    assert cfg["rope_scaling"]["long_factor"] == [1.0] * 8


def test_config_json_graph_wins_and_defaults():
    spec = dict(SPEC, rotary_dim=8, rope_theta=None, intermediate_size=96, sliding_window=8)
    cfg = cj.make_config_json(spec, _hf(rope_parameters={"rope_type": "default", "rope_theta": 1e6}), "0.11.0")
    assert (cfg["intermediate_size"], cfg["partial_rotary_factor"], cfg["rope_theta"]) == (96, 0.5, 1e6)
    assert cfg["sliding_window"] == 8
    bare = cj.make_config_json(SPEC, None, "0.5.0")
    assert (bare["max_position_embeddings"], bare["rms_norm_eps"], bare["rope_scaling"]) == (4096, 1e-6, None)
    assert bare["intermediate_size"] is None
    with pytest.raises(RewriteError, match="three parts"):
        cj.make_config_json(SPEC, None, "0.9")


def test_config_json_from_real_tiny_configs(tmp_path):
    """The saved transformers-5 configs of the tiny families pass the cross-check and translate."""
    cases = {"gemma3": dict(rope_theta=10000.0), "phi3": dict(rotary_dim=8),
             "gptj": dict(num_key_value_heads=4, rotary_dim=8), "llama3": dict(rope_theta=500000.0)}
    for family, extra in cases.items():
        hf = tiny.describe(tiny.build_checkpoint(family, tmp_path / family))
        spec = dict(SPEC, **extra)
        cj.cross_check(spec, hf)
        cfg = cj.make_config_json(spec, hf, "0.9.0")
        assert cfg["intermediate_size"] == 128 and cfg["max_position_embeddings"] == 256
        assert (cfg["rope_scaling"] is None) == (family != "llama3")
    assert cfg["rope_scaling"]["rope_type"] == "llama3"


@pytest.mark.parametrize("field,value", [
    ("num_key_value_heads", 4), ("num_attention_heads", 8), ("hidden_size", 128), ("vocab_size", 384),
    ("num_hidden_layers", 3), ("head_dim", 32),
])
def test_cross_check_mismatch(field, value):
    with pytest.raises(RewriteError) as err:
        cj.cross_check(SPEC, _hf(**{field: value}))
    msg = str(err.value)
    assert "\n" not in msg and field in msg and f"{field}={value}" in msg and f"={SPEC[field]}" in msg


def test_cross_check_layouts():
    cj.cross_check(SPEC, None)
    no_head_dim = _hf()
    del no_head_dim["head_dim"]
    cj.cross_check(SPEC, no_head_dim)  # head_dim = hidden / heads
    cj.cross_check(SPEC, _hf(rope_parameters={"rope_type": "default", "rope_theta": 10005.0}))  # within 1e-3
    with pytest.raises(RewriteError, match=r"rope_theta=500000.0 but the graph has rope_theta=10000.0"):
        cj.cross_check(SPEC, _hf(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}))
    wrapped = {"model_type": "gemma3", "text_config": _hf(num_key_value_heads=1)}
    with pytest.raises(RewriteError, match="num_key_value_heads=1"):
        cj.cross_check(SPEC, wrapped)
    mha = _hf()
    del mha["num_key_value_heads"]  # absent means as many as query heads
    with pytest.raises(RewriteError, match="num_key_value_heads=4"):
        cj.cross_check(SPEC, mha)


def test_write_config_json(tmp_path):
    cfg = cj.make_config_json(SPEC, _hf(), "0.9.0")
    text = cj.write_config_json(cfg, tmp_path).read_text()
    assert text.endswith("}\n") and json.loads(text) == cfg
    assert list(json.loads(text)) == sorted(cfg)
