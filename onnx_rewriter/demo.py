"""`python -m onnx_rewriter.demo DIR`: build the bundled tiny demo checkpoint into DIR and print its path.

Idempotent: a DIR that already holds a complete checkpoint is left as is, so `make demo` can rerun.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEMO_FAMILY = "llama"
_NEEDED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def build_demo(out_dir) -> Path:
    out = Path(out_dir)
    if not all((out / name).is_file() for name in _NEEDED):
        from onnx_rewriter.tiny import build_checkpoint

        build_checkpoint(DEMO_FAMILY, out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m onnx_rewriter.demo", description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="folder to write the demo checkpoint into")
    args = parser.parse_args(argv)
    print(build_demo(args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
