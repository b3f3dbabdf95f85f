"""Command line: `python -m onnx_rewriter IN.onnx OUT_DIR` plus `export`, `verify` and `inspect`.

Every failure the user can fix ends in one line `error: ...` and exit code 2 (1 for a failed verify),
without a traceback unless --debug. Anything else is a bug: `error: internal error (...)`, exit code 3.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import RewriteError

log = logging.getLogger("onnx_rewriter")
COMMANDS = ("rewrite", "export", "verify", "inspect")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _rewrite_opts(p: argparse.ArgumentParser) -> None:
    from . import targets

    p.add_argument("--target", default=targets.DEFAULT, help=f"runtime contract: {', '.join(sorted(targets.TARGETS))}")
    p.add_argument("--dtype", default="float16", help="float16 (runtime) or float32 (debugging)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--external-data", action="store_true", default=None,
                   help="write weights to model.onnx.data (automatic above 2 GB)")
    p.add_argument("--report", help="write the per-layer match report to this JSON file")
    # deployment features (onnx_rewriter/features/): options -> pipeline.Options fields of the same name
    p.add_argument("--quantize", choices=["int4"], help="int4: INT4 weight-only linears (groupwise RTN, G=128)")
    p.add_argument("--int4-plugin-version", type=int, choices=[1, 2], help="INT4 plugin layout on edgellm-0.11 "
                   "(default 2, Int4GroupwiseGemmPluginV2)")


def _feature_opts(args) -> dict:
    return {"quantize": args.quantize, "int4_plugin_version": args.int4_plugin_version}


def build_parser(cmd: str) -> argparse.ArgumentParser:
    if cmd == "rewrite":
        p = argparse.ArgumentParser(prog="python -m onnx_rewriter", description="Rewrite a plain ONNX export of a "
                                    "decoder LLM for NVIDIA EdgeLLM. Other commands: export, verify, inspect.")
        p.add_argument("input", help="baseline .onnx file")
        p.add_argument("output_dir", help="output folder (created atomically)")
        p.add_argument("--config", help="HF config.json to cross-check (default: one beside the input)")
        p.add_argument("--tokenizer", help="tokenizer folder (default: the input's folder)")
        _rewrite_opts(p)
    elif cmd == "export":
        p = argparse.ArgumentParser(prog="python -m onnx_rewriter export", description="Export an HF checkpoint "
                                    "(id or folder) to ONNX and rewrite it.")
        p.add_argument("--model", required=True, help="HF model id or local checkpoint folder")
        p.add_argument("--output_dir", "--output-dir", required=True)
        p.add_argument("--device", default="cpu")
        p.add_argument("--trust_remote_code", action="store_true")
        p.add_argument("--verify", action="store_true", help="run verify against the HF model afterwards")
        _rewrite_opts(p)
    elif cmd == "verify":
        p = argparse.ArgumentParser(prog="python -m onnx_rewriter verify", description="Run a rewritten folder on "
                                    "the CPU reference and compare logits with the HF model or a baseline ONNX.")
        p.add_argument("out_dir")
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--model", help="HF checkpoint folder or id")
        src.add_argument("--baseline", help="the baseline .onnx the folder was rewritten from")
        p.add_argument("--steps", type=int, default=8, help="greedy decode steps after the prefill")
    else:
        p = argparse.ArgumentParser(prog="python -m onnx_rewriter inspect", description="Show what the rewriter "
                                    "sees in a graph, without writing anything.")
        p.add_argument("input")
        p.add_argument("--target", default=None)
    _common(p)
    return p


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

    def restore():
        pkg.removeHandler(handler)
        for lg, lvl in saved:
            lg.setLevel(lvl)

    from . import progress

    progress.set_quiet(args.quiet)  # bars: on a terminal only, never with -q
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
    from . import pipeline

    if cmd == "rewrite":
        run = pipeline.rewrite(args.input, args.output_dir, target=args.target, dtype=args.dtype, config=args.config,
                               tokenizer=args.tokenizer, force=args.force, external_data=args.external_data,
                               **_feature_opts(args))
        _write_report(run, args.report)
        _print_summary(run, args.output_dir, args.quiet)
        return 0
    if cmd == "export":
        import time

        from .export import export

        t0 = time.perf_counter()
        run = export(args.model, args.output_dir, target=args.target, dtype=args.dtype, device=args.device,
                     trust_remote_code=args.trust_remote_code, force=args.force, external_data=args.external_data,
                     **_feature_opts(args))
        _write_report(run, args.report)
        _print_summary(run, args.output_dir, args.quiet, total_s=time.perf_counter() - t0)
        if args.verify:
            from .reference.verify import verify

            return 0 if verify(args.output_dir, model=args.model).passed else 1
        return 0
    if cmd == "verify":
        from .reference.verify import verify

        return 0 if verify(args.out_dir, model=args.model, baseline=args.baseline, steps=args.steps).passed else 1
    from .inspect import inspect

    print(inspect(args.input, target=args.target))
    return 0


def _write_report(run, path) -> None:
    if path:
        try:
            with open(path, "w") as fh:
                fh.write(run.report.to_json())
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
    args = build_parser(cmd).parse_args(argv)
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
        print("error: interrupted; the output folder was left as it was", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not the user's input: still one line, never a bare traceback
        if args.debug:
            raise
        what = _one_line(f"{type(exc).__name__}: {exc}")[:300]
        print(f"error: internal error ({what}); rerun with --debug for the traceback and please report it",
              file=sys.stderr)
        return 3
    finally:
        restore_logging()
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)


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
