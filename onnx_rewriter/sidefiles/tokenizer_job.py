"""Tokenizer side files, written by a lean child process while the parent streams the weights.

They need transformers' AutoTokenizer, and importing it pulls in torch: ~5 s and ~250 MB, as much
as the rest of a 0.5B rewrite. The tokenizer files need no torch, so when this process has not
imported transformers yet (the `rewrite` CLI), a child imports it with torch hidden (~1.5 s, 70 MB)
and runs alongside the weight writing. When transformers is already loaded (export, tests, notebooks)
the work stays in-process, where it costs nothing extra. The files are the same either way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ..errors import RewriteError


def write_tokenizer_side_files(tok_dir, chat_template_file: str, out_dir) -> list[str] | None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json and the target's chat template file.

    Returns the names written, or None when `tok_dir` holds no tokenizer.
    """
    from . import chat_template, tokenizer as tok

    tokenizer = tok.load_tokenizer(tok_dir)
    if tokenizer is None:
        return None
    files = tok.write_tokenizer_files(tokenizer, out_dir)
    if chat_template_file == "chat_template.jinja":
        files.append(chat_template.write_chat_template_jinja(tokenizer, out_dir).name)
    else:
        files.append(chat_template.write_processed_chat_template(tokenizer, out_dir).name)
    return files


class Job:
    """A running child; `result()` returns what write_tokenizer_side_files would have returned."""

    def __init__(self, args: tuple):
        self.args = args
        pkg_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", PYTHONPATH=os.pathsep.join(
            [pkg_root] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
        self.proc = subprocess.Popen([sys.executable, "-m", __name__, *map(str, args)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, text=True)

    def result(self) -> list[str] | None:
        out, _ = self.proc.communicate()
        try:
            answer = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            answer = {}
        if "error" in answer:  # the user's to fix (a broken tokenizer): same message as in-process
            raise RewriteError(answer["error"])
        if "files" not in answer:  # the child died oddly: redo it here, where errors show as usual
            return write_tokenizer_side_files(*self.args)
        return answer["files"]

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.proc.returncode is None:  # never collected
            if exc_type is not None:
                self.proc.kill()  # the output folder is about to be removed: stop writing into it
            self.proc.communicate()  # and never leave it writing into a folder that is renamed next
        return False


class _InProcess:
    def __init__(self, args: tuple):
        self.args = args

    def result(self):
        return write_tokenizer_side_files(*self.args)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def start(tok_dir, chat_template_file: str, out_dir):
    """Start writing the tokenizer side files into `out_dir`; `.result()` collects them."""
    args = (tok_dir, chat_template_file, out_dir)
    if "transformers" in sys.modules or os.environ.get("ONNX_REWRITER_NO_TOKENIZER_JOB"):
        return _InProcess(args)
    try:
        return Job(args)
    except OSError:  # cannot start a process here: fine, in-process then
        return _InProcess(args)


def _main(argv: list[str]) -> int:
    sys.modules["torch"] = None  # transformers then skips torch (find_spec sees None): tokenizers need none
    tok_dir, chat_template_file, out_dir = argv
    try:
        files = write_tokenizer_side_files(tok_dir, chat_template_file, out_dir)
        answer = {"files": files}
    except RewriteError as exc:
        answer = {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - the parent redoes the work in-process and reports it there
        answer = {"crash": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
