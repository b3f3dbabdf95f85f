"""Greedy generation on the CPU reference: what the runtime would answer to a chat prompt."""

from __future__ import annotations

from pathlib import Path

from onnx_rewriter.modelio.config_file import read_config
from onnx_rewriter.reference.runner import Session, runner_for


def load_tokenizer(folder):
    """The tokenizer of a rewritten folder. Its config.json is the runtime's (model_type "llm"), which
    transformers would read and warn about; an empty config stops it from looking."""
    from transformers import AutoTokenizer, PretrainedConfig

    return AutoTokenizer.from_pretrained(str(folder), config=PretrainedConfig())


def chat_prompt(tokenizer_dir, question: str) -> list[int]:
    """Token ids of a one-turn chat with the generation prompt, rendered by the model's own template."""
    tok = load_tokenizer(tokenizer_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True)["input_ids"]
    return [int(i) for i in ids]


def eos_ids(checkpoint_or_folder) -> set[int]:
    """End-of-sequence ids from generation_config.json / config.json (either may hold a list)."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = Path(checkpoint_or_folder) / name
        if path.is_file():
            value = read_config(path).get("eos_token_id")
            ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return ids


def greedy(out_dir, prompt: list[int], max_new_tokens: int, eos: set[int] = frozenset()) -> list[int]:
    """Prefill `prompt`, then decode greedily until an eos id (kept) or max_new_tokens."""
    session = Session(out_dir)
    runner = runner_for(session, 1, capacity=len(prompt) + max_new_tokens + 1)
    logits = runner.prefill([list(prompt)])
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        tokens.append(session.token(logits[0].argmax()))  # a reduced vocabulary maps back to token ids
        if tokens[-1] in eos or len(tokens) == max_new_tokens:
            break
        logits = runner.decode([tokens[-1]])
    return tokens


def hf_greedy(checkpoint, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers.generate's greedy answer (fp32), for comparison."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    return [int(t) for t in out[0, len(prompt):]]
