"""Tokenizer side files, written by a lean child process while the parent rewrites the graph.

They need transformers' AutoTokenizer, and importing it pulls in torch: ~5 s and ~250 MB, as much
as the rest of a 0.5B rewrite. The tokenizer files need no torch, so when this process has not
imported transformers yet (the `rewrite` CLI), a child imports it with torch hidden (~2 s, 70 MB),
started by the CLI before its own imports (start_early) or by the rewrite before the load. When
transformers is already loaded (export, tests, notebooks) the work stays in-process, where it costs
nothing extra. The files are the same either way.
"""

from __future__ import annotations

import base64
import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .. import safety
from ..errors import RewriteError


def write_tokenizer_side_files(tok_dir, chat_template_file: str, out_dir, trust_remote_code: bool = False
                               ) -> list[str] | None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json and the target's chat template file.

    Returns the names written, or None when `tok_dir` holds no tokenizer.
    """
    # Imported here, in the child: the parent imports this module only to start it.
    from . import chat_template
    from . import tokenizer as tok

    tokenizer = tok.load_tokenizer(tok_dir, trust_remote_code)
    if tokenizer is None:
        return None
    files = tok.write_tokenizer_files(tokenizer, out_dir)
    if chat_template_file == "chat_template.jinja":
        files.append(chat_template.write_chat_template_jinja(tokenizer, out_dir).name)
    else:
        files.append(chat_template.write_processed_chat_template(tokenizer, out_dir).name)
    return files


class Job:
    """A child that writes the files in a scratch folder and sends their bytes back over its stdout (a few MB
    at most). The folder is ours (safety.make_temp, named with our pid): removed when the job ends, however
    it ends (the child is SIGKILLed when the rewrite fails), and by a later run if we are killed.
    `result(out_dir)` writes them into `out_dir` and returns what write_tokenizer_side_files would have."""

    def __init__(self, tok_dir, chat_template_file: str, trust_remote_code: bool = False):
        self.args = (tok_dir, chat_template_file)
        self.trust = trust_remote_code
        pkg_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", PYTHONPATH=os.pathsep.join(
            [pkg_root] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
        self.scratch = safety.make_temp("tokenizer")
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", __name__, str(tok_dir), chat_template_file,
                                          str(self.scratch), "trust" if trust_remote_code else "no-trust"],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                         env=env, text=True)
        except BaseException:
            shutil.rmtree(self.scratch, ignore_errors=True)
            raise

    def result(self, out_dir) -> list[str] | None:
        try:
            out, _ = self.proc.communicate()
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)
        try:
            answer = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            answer = {}
        if "error" in answer:  # the user's to fix (a broken tokenizer): same message as in-process
            raise RewriteError(answer["error"])
        if "files" not in answer:  # the child died oddly: redo it here, where errors show as usual
            return write_tokenizer_side_files(*self.args, out_dir, self.trust)
        if answer["files"] is None:
            return None
        for name, data in answer["files"].items():
            (Path(out_dir) / name).write_bytes(base64.b64decode(data))
        return list(answer["files"])

    def close(self) -> None:
        """Stop the child if it still runs (the rewrite failed); its scratch folder goes with it."""
        if self.proc.returncode is None:
            self.proc.kill()
            self.proc.communicate()
        shutil.rmtree(self.scratch, ignore_errors=True)


class _InProcess:
    def __init__(self, tok_dir, chat_template_file: str, trust_remote_code: bool = False):
        self.args = (tok_dir, chat_template_file)
        self.trust = trust_remote_code

    def result(self, out_dir):
        return write_tokenizer_side_files(*self.args, out_dir, self.trust)

    def close(self) -> None:
        pass


def start(tok_dir, chat_template_file: str, trust_remote_code: bool = False):
    """Start on the tokenizer side files; `.result(out_dir)` puts them in `out_dir`, `.close()` drops them.
    A child start_early() made for the same files is taken over."""
    key = (str(tok_dir), chat_template_file, bool(trust_remote_code))
    return (_EARLY.pop(key, None) or _child(tok_dir, chat_template_file, trust_remote_code)
            or _InProcess(tok_dir, chat_template_file, trust_remote_code))


def _child(tok_dir, chat_template_file: str, trust_remote_code: bool = False) -> Job | None:
    """A child process, or None where the work is better done in-process."""
    if "transformers" in sys.modules or os.environ.get("ONNX_REWRITER_NO_TOKENIZER_JOB"):
        return None
    try:
        return Job(tok_dir, chat_template_file, trust_remote_code)
    except OSError:  # cannot start a process here: fine, in-process then
        return None


_EARLY: dict[tuple[str, str, bool], Job] = {}


def start_early(tok_dir, chat_template_file: str, trust_remote_code: bool = False) -> None:
    """Start the child now, before the caller's own imports (the `rewrite` CLI: 0.3 s of them), so that its
    2 s of CPU overlap the load and the matching rather than the write; start() takes it over. Pair with
    drop_early()."""
    job = _child(tok_dir, chat_template_file, trust_remote_code)
    if job is not None:
        _EARLY[(str(tok_dir), chat_template_file, bool(trust_remote_code))] = job


def drop_early() -> None:
    """Stop a child start_early() made that nobody took over (the run failed before its write)."""
    while _EARLY:
        _EARLY.popitem()[1].close()


def _main(argv: list[str]) -> int:
    # A short-lived process that makes no garbage worth collecting: the collections during transformers'
    # import were 0.25 s of its 2.2 s of CPU, taken from the parent's rewrite on a 2-core machine.
    gc.disable()
    sys.modules["torch"] = None  # transformers then skips torch (find_spec sees None): tokenizers need none
    tok_dir, chat_template_file, scratch, trust = argv  # scratch: the parent's folder, the parent removes it
    try:
        files = write_tokenizer_side_files(tok_dir, chat_template_file, scratch, trust == "trust")
        answer = {"files": None if files is None else  # in order: the names come back as written
                  {f: base64.b64encode((Path(scratch) / f).read_bytes()).decode() for f in files}}
    except RewriteError as exc:
        answer = {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - the parent redoes the work in-process and reports it there
        answer = {"crash": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
