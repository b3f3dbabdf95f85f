"""Command line: `python -m onnx_rewriter IN.onnx OUT_DIR` plus `export`, `verify` and `inspect`.

Every failure the user can fix ends in one line `error: ...` and exit code 2 (1 for a failed verify),
without a traceback unless --debug. Anything else is a bug: `error: internal error (...)`, exit code 3.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .errors import RewriteError

log = logging.getLogger("onnx_rewriter")
COMMANDS = ("rewrite", "export", "verify", "inspect")


class _UsageError(Exception):
    """A wrong command line: argparse's message, printed as our one `error:` line."""


CONSOLE_SCRIPT = "onnx-rewriter"  # setup.cfg's console_scripts entry


def _invoked_as(prog: str) -> str:
    """`python -m onnx_rewriter ...` as the user typed it: run as the console script, `onnx-rewriter ...`."""
    if sys.argv and os.path.basename(sys.argv[0]) == CONSOLE_SCRIPT:
        return prog.replace("python -m onnx_rewriter", CONSOLE_SCRIPT, 1)
    return prog


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, prog=None, **kwargs):
        super().__init__(*args, prog=_invoked_as(prog) if prog else prog, **kwargs)

    def error(self, message):
        raise _UsageError(f"{message}; see {self.prog} --help")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="quiet: only errors and the final result line (no tables, warnings, stage lines or bars)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _rewrite_opts(p: argparse.ArgumentParser) -> None:
    from onnx_rewriter import targets
    from onnx_rewriter.features import OPTIONS
    from onnx_rewriter.modelio import dtype

    p.add_argument("--target", default=targets.DEFAULT, choices=sorted(targets.TARGETS),
                   help=f"runtime contract ({targets.describe()}; default: {targets.DEFAULT})")
    p.add_argument("--dtype", default="float16", choices=sorted(dtype.NAMES),
                   help="float type of the weights written: float16 (what the runtime runs; default) or float32 "
                        "(debugging)")
    p.add_argument("--force", action="store_true",
                   help="replace an earlier output of onnx_rewriter (never a folder it did not write)")
    p.add_argument("--external-data", "--external_data", dest="external_data", action="store_true", default=None,
                   help="write weights to model.onnx.data (automatic above 2 GB)")
    p.add_argument("--report", metavar="FILE", help="write the per-layer match report to this JSON file")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="folder holding the tokenizer (default: the input's folder / the checkpoint)")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="write no tokenizer files (a warning says which are missing) instead of requiring them")
    p.add_argument("--calibration", metavar="FILE",
                   help="calibration prompts, one a line, for --int4-method awq, --kv-cache fp8 and --quantize "
                        "fp8/nvfp4/int8-sq "
                        "(default: a small bundled set)")
    # deployment features (onnx_rewriter/features/): each feature's options dataclass adds its own flags,
    # dest = the pipeline.Options field of the same name
    for cls in OPTIONS:
        cls.add_arguments(p)


def _trust_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", "--trust_remote_code", dest="trust_remote_code", action="store_true",
                   help="let transformers run the model folder's own Python code (a custom model or tokenizer "
                        "class); only for folders you trust. Without it such code never runs, and nothing asks")


def _rewrite_kwargs(args) -> dict:
    """The pipeline.Options keywords of a parsed rewrite/export command line."""
    import dataclasses

    from .features import OPTIONS

    core = dict(target=args.target, dtype=args.dtype, force=args.force, external_data=args.external_data,
                tokenizer=args.tokenizer, no_tokenizer=args.no_tokenizer, calibration=args.calibration,
                report=args.report)
    return {**core, **{f.name: getattr(args, f.name) for cls in OPTIONS for f in dataclasses.fields(cls)
                       if f.metadata.get("flag")}}


def _add_rewrite(sub) -> None:
    p = sub.add_parser("rewrite", prog="python -m onnx_rewriter", help="rewrite a baseline .onnx (the default "
                       "command: `python -m onnx_rewriter IN.onnx OUT_DIR`)", description="Rewrite a plain ONNX "
                       "export of a decoder LLM for NVIDIA EdgeLLM. Other commands: export, verify, inspect.")
    p.add_argument("input", help="baseline .onnx file")
    p.add_argument("output_dir", help="output folder (created atomically; must lie outside the input's folder)")
    p.add_argument("--config", metavar="FILE", help="HF config.json to cross-check (default: one beside the input)")
    _trust_opt(p)
    _rewrite_opts(p)


def _add_export(sub) -> None:
    p = sub.add_parser("export", prog="python -m onnx_rewriter export", help="export an HF checkpoint and "
                       "rewrite it", description="Export an HF checkpoint (id or folder) to ONNX and rewrite it.")
    p.add_argument("--model", required=True, help="HF model id or local checkpoint folder")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True, metavar="DIR",
                   help="output folder (created atomically; must lie outside the checkpoint)")
    p.add_argument("--device", default="cpu", help="torch device the model is loaded and traced on: cpu "
                   "(default) or cuda[:N] (needs a CUDA build of torch)")
    _trust_opt(p)
    p.add_argument("--verify", action="store_true", help="run verify against the HF model afterwards")
    p.add_argument("--keep-baseline", metavar="DIR", help="also keep the baseline export (model.onnx, "
                   "config.json, tokenizer) in DIR, ready for a later `rewrite`")
    _rewrite_opts(p)


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", prog="python -m onnx_rewriter verify", help="compare a rewritten folder with "
                       "the HF model or the baseline", description="Run a rewritten folder on the CPU reference "
                       "and compare logits with the HF model or a baseline ONNX.")
    p.add_argument("out_dir", help="a folder written by onnx_rewriter (model.onnx, config.json, ...)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF checkpoint folder or id")
    src.add_argument("--baseline", metavar="FILE", help="the baseline .onnx the folder was rewritten from")
    p.add_argument("--steps", type=int, default=8, help="greedy decode steps after the prefill (default 8)")
    p.add_argument("--eagle-draft", metavar="DIR", help="an EAGLE3 folder (base/ + draft/): the draft checkpoint, "
                   "for the draft check and speculative decoding")
    p.add_argument("--lora-adapter", metavar="DIR", help="a PEFT adapter folder: feed its A/B matrices to the "
                   "folder's LoRA inputs and compare with the model with the adapter merged (needs --model)")
    _trust_opt(p)
    p.add_argument("--fp16-model", metavar="DIR", help="the unquantized model an AWQ/GPTQ --model was made "
                   "from: also report the INT4 error against it")


def _add_inspect(sub) -> None:
    from . import targets

    p = sub.add_parser("inspect", prog="python -m onnx_rewriter inspect", help="show what the rewriter sees, "
                       "writing nothing", description="Show what the rewriter sees in a graph, without writing "
                       "anything. Exit code 0: it would rewrite the graph; 1: it would not (the verdict says why).")
    p.add_argument("input", help="baseline .onnx file")
    p.add_argument("--target", default=None, choices=sorted(targets.TARGETS),
                   help=f"runtime contract ({targets.describe()}; default: {targets.DEFAULT})")
    p.add_argument("--config", metavar="FILE", help="HF config.json to cross-check (default: one beside the input)")


def build_parser(cmd: str | None = None) -> argparse.ArgumentParser:
    """The command line: one subcommand per entry of COMMANDS. With `cmd`, that subcommand's parser.

    `main` parses with the subcommand's own parser, so its usage errors name it (`see python -m
    onnx_rewriter export --help`); a command line without a command is a rewrite."""
    top = _Parser(prog="python -m onnx_rewriter", description="Rewrite plain ONNX exports of decoder LLMs for "
                  "NVIDIA EdgeLLM. Without a command: rewrite (`python -m onnx_rewriter IN.onnx OUT_DIR`).")
    sub = top.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}", parser_class=_Parser)
    for add in (_add_rewrite, _add_export, _add_verify, _add_inspect):
        add(sub)
    for p in sub.choices.values():
        _common(p)
    return sub.choices[cmd] if cmd is not None else top


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now: the handler outlives main(), and callers (tests) swap it."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging(args):
    """Warnings (rope scaling, missing tokenizer, ...) show by default; -q hides them, -v/-vv add more.

    The handler sits on our package logger (not via basicConfig, a no-op once anything configured the
    root logger, e.g. pytest). Returns a function that puts the loggers back as they were: main()
    called in-process (tests, notebooks) leaves no trace.
    """
    level = logging.ERROR if args.quiet else (logging.DEBUG if args.verbose > 1 else
                                              logging.INFO if args.verbose else logging.WARNING)
    pkg = logging.getLogger("onnx_rewriter")
    others = [logging.getLogger(n) for n in ("transformers", "huggingface_hub")]
    saved = [(lg, lg.level) for lg in [pkg] + others]
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    pkg.addHandler(handler)
    pkg.setLevel(level)
    for lg in others:  # their warnings obey -q too
        lg.setLevel(max(level, logging.WARNING))
    # transformers resets its logger's level when it is first imported (later, lazily): tell it by its own
    # variable too, or -q would still show its load report.
    import os

    env_was = os.environ.get("TRANSFORMERS_VERBOSITY")
    if env_was is None:
        os.environ["TRANSFORMERS_VERBOSITY"] = logging.getLevelName(max(level, logging.WARNING)).lower()

    from . import progress

    progress.set_quiet(args.quiet)  # bars: on a terminal only, never with -q
    lines_were = progress.set_stage_lines(True)  # off a terminal: one line per stage instead

    def restore():
        pkg.removeHandler(handler)
        for lg, lvl in saved:
            lg.setLevel(lvl)
        progress.set_stage_lines(lines_were)
        if env_was is None:
            os.environ.pop("TRANSFORMERS_VERBOSITY", None)

    return restore


def _print_summary(run, out_dir, quiet: bool = False, total_s: float | None = None) -> None:
    n = sum(l.rewritten for l in run.report.layers)
    if not quiet:
        print(run.report.table(), file=sys.stderr)
    took = f"{run.report.seconds:.1f}s" + (f" (export {total_s:.1f}s in all)" if total_s is not None else "")
    print(f"rewrote {n}/{len(run.report.layers)} layers for {run.options.target} in {took}: "
          f"{out_dir} ({_sizes(out_dir, run.files)})")


def _sizes(out_dir, files) -> str:
    """'model.onnx 0.1 MB, model.onnx.data 988 MB, ...; 1.3 GB in all'."""
    import os

    def fmt(n: int) -> str:
        return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"

    sizes = {f: os.path.getsize(os.path.join(out_dir, f)) for f in files if os.path.isfile(os.path.join(out_dir, f))}
    parts = [f"{f} {fmt(sizes[f])}" if f in sizes else f for f in files]
    return ", ".join(parts) + f"; {fmt(sum(sizes.values()))} in all"


def _run(cmd: str, args) -> int:
    if cmd == "rewrite" and not args.no_tokenizer:
        from pathlib import Path

        from . import targets
        from .sidefiles import tokenizer_job

        # the tokenizer files' child, before the pipeline's imports (see start_early); dropped if not taken.
        # argparse checked the name; the rewrite's options resolve it (pipeline.make_options).
        tokenizer_job.start_early(Path(args.tokenizer) if args.tokenizer else Path(args.input).parent,
                                  targets.get(args.target).chat_template_file, args.trust_remote_code)
        try:
            return _run_command(cmd, args)
        finally:
            tokenizer_job.drop_early()
    return _run_command(cmd, args)


def _run_command(cmd: str, args) -> int:
    from onnx_rewriter.pipeline import steps as pipeline

    rewrite_opts = {}
    if cmd in ("rewrite", "export"):  # --report is checked with every other written path (safety.check_writes)
        rewrite_opts = _rewrite_kwargs(args)
    if cmd == "rewrite":
        run = pipeline.rewrite(args.input, args.output_dir, config=args.config,
                               trust_remote_code=args.trust_remote_code, **rewrite_opts)
        _write_report(run, args.report)
        _print_summary(run, run.out_dir, args.quiet)
        return 0
    if cmd == "export":
        import time

        from .hf.export import export

        t0 = time.perf_counter()
        run = export(args.model, args.output_dir, device=args.device, trust_remote_code=args.trust_remote_code,
                     keep_baseline=args.keep_baseline, **rewrite_opts)
        _write_report(run, args.report)
        _print_summary(run, run.out_dir, args.quiet, total_s=time.perf_counter() - t0)
        if args.verify:
            from onnx_rewriter.verification.llm import verify

            draft = args.eagle_draft if isinstance(args.eagle_draft, str) else None
            return 0 if verify(run.out_dir.parent if draft else run.out_dir, model=args.model, quiet=args.quiet,
                               trust_remote_code=args.trust_remote_code, eagle_draft=draft).passed else 1
        return 0
    if cmd == "verify":
        from onnx_rewriter.verification.llm import verify

        return 0 if verify(args.out_dir, model=args.model, baseline=args.baseline, steps=args.steps,
                           quiet=args.quiet, lora_adapter=args.lora_adapter,
                           fp16_model=args.fp16_model, trust_remote_code=args.trust_remote_code,
                           eagle_draft=args.eagle_draft).passed else 1
    from onnx_rewriter.pipeline.inspection import analyze, render

    run = analyze(args.input, target=args.target, config=args.config)
    print(render(run))
    return 0 if run.report.error is None else 1


def _write_report(run, path) -> None:
    if path:
        from .safety import write_file

        try:
            write_file(path, run.report.to_json())
        except OSError as exc:
            raise RewriteError(f"cannot write the report '{path}' ({exc.strerror}); choose another path") from None


def _refused(exc: RewriteError, args) -> None:
    """A refused rewrite still shows its table and writes --report (the failing layer and check)."""
    run = getattr(exc, "run", None)
    if run is None:
        return
    if run.report.layers and not args.quiet:
        print(run.report.table(), file=sys.stderr)
    try:
        _write_report(run, getattr(args, "report", None))
    except RewriteError as rep_exc:
        log.warning("%s", rep_exc)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv.pop(0) if argv and argv[0] in COMMANDS else "rewrite"
    try:
        args = build_parser(cmd).parse_args(argv)
    except _UsageError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    restore_logging = _setup_logging(args)
    previous = _exit_on_sigterm()
    try:
        return _run(cmd, args)
    except RewriteError as exc:
        if args.debug:
            raise
        _refused(exc, args)
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk, a read-only folder: the user's to fix; anything else is a bug
        if args.debug:
            raise
        from .safety import user_os_error

        err = user_os_error(exc, "cannot write", "free some space or choose another folder")
        if err is None:
            return _internal_error(exc)
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug, not the user's input: still one line, never a bare traceback
        if args.debug:
            raise
        return _internal_error(exc)
    finally:
        restore_logging()
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)


INTERRUPTED = "error: interrupted; no output was written (an existing output folder was left as it was)"


def _internal_error(exc: BaseException) -> int:
    what = _one_line(f"{type(exc).__name__}: {exc}")[:300]
    print(f"error: internal error ({what}); rerun with --debug for the traceback and please report it",
          file=sys.stderr)
    return 3


def _exit_on_sigterm():
    """SIGTERM unwinds like Ctrl-C, so the temporary output folder is removed (SIGKILL: see output.py).

    Returns the previous handler (restored when main() returns), or None when none was installed.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        return None
