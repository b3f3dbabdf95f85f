"""Tiny random-weight checkpoints with a locally trained tokenizer.

Tests and `make demo` need real HF checkpoint folders (config.json, safetensors, tokenizer) of many
architectures, but no model hub is reachable, so everything here is built from scratch: a byte-level
BPE trained on the paragraphs below and a few-layer model per family. Same arguments, same bytes.
"""

from __future__ import annotations

from pathlib import Path

from ..modelio.config_file import read_config

# Small but varied English: enough distinct pairs for ~60 BPE merges.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still learn the shape of a sentence,
even when its weights are random and its vocabulary is tiny.

Once upon a time there was a little robot who lived in a workshop by the sea. Every morning the
robot opened the windows, listened to the waves, and counted the boats that sailed past the harbour.
When the weather was bad it stayed inside, reading old manuals about engines, lamps and clocks.

Language models read text as tokens. A tokenizer splits words into pieces, and the model predicts
the next piece from the ones before it. Attention lets every position look back at the earlier
positions, and a cache of keys and values keeps that cheap while the answer is generated.

Please answer the question in one short sentence. What is the capital of France? The capital of
France is Paris. How many legs does a spider have? A spider has eight legs. Thank you for asking!

Numbers matter too: 0 1 2 3 4 5 6 7 8 9, 10, 42, 100, 2024, 3.14 and 1e-6 all appear in configs.
"""

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_VOCAB = 320  # 256 byte symbols + 6 specials + 58 merges

# ChatML with an injected default system prompt and a Qwen3-style `enable_thinking` switch, so the
# side-file code sees every feature it must extract (roles, default system, both generation prompts).
DEFAULT_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking %}{{- '<think>\\n' }}{%- endif %}"
    "{%- endif %}"
)


def build_tokenizer(out_dir, chat_template: str | None = "default"):
    """Train the tiny BPE tokenizer and save it (transformers layout) into `out_dir`.

    chat_template: "default" (ChatML above), None (a base model without template) or a Jinja string.
    Returns the folder.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Byte-level: every string encodes, so <unk> never appears and tests can feed any text.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)

    if chat_template == "default":
        chat_template = DEFAULT_CHAT_TEMPLATE
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=256,
    )
    if chat_template is not None:
        hf.chat_template = chat_template
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    return out


# --- model families ------------------------------------------------------------------------------

# Shared by the llama-like families; each builder overrides what makes its family different.
_BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    # 5x the HF default: with std 0.02 attention scores of a 64-wide model are ~0, every head just
    # averages, and RoPE or mask bugs would barely move the logits.
    initializer_range=0.1,
)


def _cfg(cls_name: str, base: dict | None = None, **kw):
    import transformers

    args = dict(_BASE if base is None else base)
    args.update(kw)
    return getattr(transformers, cls_name)(**args)


def _no_head_dim(**kw):
    # Qwen2 and Phi3 configs derive head_dim from hidden/heads and have no such field.
    base = {k: v for k, v in _BASE.items() if k != "head_dim"}
    base.update(kw)
    return base


FAMILIES = {
    "llama": lambda: _cfg("LlamaConfig"),
    "llama_tied": lambda: _cfg("LlamaConfig", tie_word_embeddings=True),
    "smollm": lambda: _cfg(
        "LlamaConfig", hidden_size=144, intermediate_size=384, num_attention_heads=9,
        num_key_value_heads=3, tie_word_embeddings=True,
    ),
    # transformers 5: scaling lives in `rope_parameters` together with rope_theta. With head_dim 16
    # and original context 256, frequencies 0-1 stay as they are, 2 is smoothed, 3-7 are divided by 8
    # (like the real model, whose highest frequencies are untouched).
    "llama3": lambda: _cfg(
        "LlamaConfig",
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 256,
        },
    ),
    # q/k/v biases are built into Qwen2 (random, see perturb). A theta that is not round: a snapping rule too
    # loose would write 1e6 for it.
    "qwen2": lambda: _cfg("Qwen2Config", _no_head_dim(), rms_norm_eps=1.7e-6,
                          rope_parameters={"rope_type": "default", "rope_theta": 999100.0}),
    "qwen3": lambda: _cfg("Qwen3Config"),  # q_norm / k_norm built in
    # YaRN (Qwen2.5 long-context style): attention_scaling 0.1·ln(4) + 1 multiplies cos and sin. head_dim 32 and
    # an original context of 1024 keep the top 3 frequencies unscaled (as in real YaRN models, whose theta is
    # read off them); 4-8 ramp, the rest are divided by 4.
    "yarn": lambda: _cfg(
        "Qwen2Config", _no_head_dim(), num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
        rope_parameters={"rope_type": "yarn", "rope_theta": 99100.0, "factor": 4.0,
                         "original_max_position_embeddings": 1024},
    ),
    "mistral": lambda: _cfg("MistralConfig", sliding_window=None),
    "mistral_window": lambda: _cfg("MistralConfig", sliding_window=8),
    # Phi3 keeps partial_rotary_factor inside rope_parameters; fused qkv_proj and gate_up_proj.
    "phi3": lambda: _cfg(
        "Phi3Config", _no_head_dim(),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    ),
    # head_dim * heads != hidden on purpose; MQA.
    "gemma": lambda: _cfg("GemmaConfig", head_dim=32, num_key_value_heads=1, tie_word_embeddings=True),
    "gemma2": lambda: _cfg(
        "Gemma2Config", query_pre_attn_scalar=16, sliding_window=8, tie_word_embeddings=True,
    ),
    # Text-only Gemma3: one local (sliding) and one global layer, each with its own rope theta.
    "gemma3": lambda: _cfg(
        "Gemma3TextConfig", query_pre_attn_scalar=16, sliding_window=8, tie_word_embeddings=True,
        layer_types=["sliding_attention", "full_attention"],
    ),
    # Granite: softmax scale attention_multiplier (not 1/sqrt(D)), embedding / residual / logits multipliers.
    "granite": lambda: _cfg(
        "GraniteConfig", attention_multiplier=0.0625, embedding_multiplier=12.0, residual_multiplier=0.22,
        logits_scaling=2.0,
    ),
    # Mixture-of-Experts (issue 28): H 128 and I 64 meet the MoE plugins' H % 128 and I % 64; 8 experts need
    # --quantize int4 (Int4MoePlugin), the tests' num_experts=128 variant is an Fp16MoePlugin.
    # Qwen3-MoE: every layer routed, 8 experts, top-2, renormalized top-k weights (norm_topk_prob).
    "qwen3_moe": lambda: _cfg("Qwen3MoeConfig", hidden_size=128, moe_intermediate_size=64, num_experts=8,
                              num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
    # Qwen2-MoE: layer 0 a dense MLP (mlp_only_layers), layer 1 routed (top-2 of 8, not renormalized) plus a shared
    # expert behind a sigmoid gate.
    "qwen2_moe": lambda: _cfg("Qwen2MoeConfig", _no_head_dim(), hidden_size=128, moe_intermediate_size=64,
                              shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                              norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[0]),
    # Mixtral: every layer routed, 8 experts (w1 gate, w3 up, w2 down) of I = intermediate_size, top-2, renormalized.
    "mixtral": lambda: _cfg("MixtralConfig", hidden_size=128, intermediate_size=64, num_local_experts=8,
                            num_experts_per_tok=2),
    # Interleaved (GPT-J style) partial rotary, LayerNorm, parallel attention+MLP.
    "gptj": lambda: _cfg(
        "GPTJConfig", {}, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_inner=128, n_positions=256,
        tie_word_embeddings=False, initializer_range=0.1,
    ),
}

_DTYPES = ("float32", "float16", "bfloat16")


def _round_up(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def perturb(model, seed: int = 0) -> None:
    """Random non-zero biases and non-unit norm weights (in place).

    HF initialises biases to 0 and norm weights to 1 (Gemma's 1 + w norms to 0): a bug that swaps bias slices
    or drops a norm's scale would change nothing in such a model. Norm weights get 1 + N(0, 0.2) (Gemma's
    w gets N(0, 0.2): 1 + w is not 1 either), biases N(0, 0.5), on the order of the projections' outputs.
    """
    import torch

    gen = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = "norm" in type(module).__name__.lower()
            for name, p in module.named_parameters(recurse=False):
                if name == "bias":
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
                elif is_norm and name == "weight":
                    p.add_(torch.randn(p.shape, generator=gen) * 0.2)


def build_checkpoint(family: str, out_dir, *, dtype: str = "float32", seed: int = 0,
                     chat_template: str | None = "default", **config_overrides):
    """Build a tiny random `family` model and its tokenizer into `out_dir` (HF layout). Returns the folder.

    config_overrides are set on the transformers config after the family defaults (e.g. num_hidden_layers=3).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(sorted(FAMILIES))}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    out = build_tokenizer(out_dir, chat_template=chat_template)
    tok = AutoTokenizer.from_pretrained(out)

    config = FAMILIES[family]()
    # Token ids must match the tokenizer (family defaults such as GPT-J's 50256 are out of range).
    config.vocab_size = _round_up(len(tok))
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    params = getattr(config, "rope_parameters", None)
    if "rope_theta" in config_overrides and isinstance(params, dict) and "rope_theta" in params:
        params["rope_theta"] = float(config_overrides["rope_theta"])  # transformers 5 reads it from here
    types = getattr(config, "layer_types", None)
    if "layer_types" not in config_overrides and isinstance(types, list) and types \
            and len(types) != config.num_hidden_layers:
        # transformers derives layer_types from the layer count only when the config is built: repeat the
        # family's pattern over the new count (Gemma3's sliding/full alternation stays alternating).
        config.layer_types = [types[i % len(types)] for i in range(config.num_hidden_layers)]
    if config.vocab_size < len(tok):
        raise ValueError(f"vocab_size {config.vocab_size} is smaller than the tokenizer ({len(tok)})")

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    perturb(model, seed)
    model = model.to(getattr(torch, dtype)).eval()
    model.config.dtype = dtype
    model.save_pretrained(out)
    return out


def describe(path) -> dict:
    """The saved config.json as a dict (handy in tests and the demo)."""
    return read_config(Path(path) / "config.json")


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m onnx_rewriter.hf.tiny", description="Build a tiny random-weight HF "
                                "checkpoint (config, safetensors, tokenizer) of one model family, for tests and demos.")
    p.add_argument("family", choices=sorted(FAMILIES), help="model family")
    p.add_argument("out_dir", help="folder to write the checkpoint into")
    p.add_argument("--dtype", default="float32", choices=_DTYPES, help="weight dtype (default float32)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    args = p.parse_args(argv)
    print(build_checkpoint(args.family, args.out_dir, dtype=args.dtype, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
