"""Byte-identity harness: sha256 of every file the rewriter writes, over a matrix of families, targets,
dtypes and features, so a refactor can show that its outputs did not change (issue 24, as issue 12).

    PYTHONPATH=CHECKOUT python bench/outputs_digest.py run --baselines DIR --out digest.json
    python bench/outputs_digest.py compare before.json after.json

`run` builds tiny checkpoints and their baseline exports into --baselines once (they depend on torch
and transformers, not on the rewriter; a second checkout's run reuses them), then, through the command
line in-process (`onnx_rewriter.cli.main`), rewrites each baseline for every target x dtype, adds the
INT4 (rtn, awq, plugin v1), FP8 KV, LoRA and reduced-vocabulary cases, one text and both VLM `export`
routes (these trace the model again on every run), and records per case either the sha256 of each output
file or the refusal (exit code and `error:` line). Only the public command line is used, so the script
runs on any checkout whatever its module layout. Nothing written holds a time or a path (the manifest
lists file names); the --report JSON holds timings and is not written.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TARGETS = ("edgellm-0.5", "edgellm-0.9", "edgellm-0.11")
DTYPES = ("float16", "float32")
# The full target x dtype matrix: a representative set (GQA, q/k/v biases, q/k norms, sliding window with
# local/global rope, fused qkv + partial rotary, MQA with head size x heads != hidden, scale multipliers).
FAMILIES = ("llama", "qwen2", "qwen3", "gemma3", "mistral_window", "phi3", "gemma", "granite")
# name -> (family, build_checkpoint keywords): K=128 so every target can take INT4 (G=128); a bf16 checkpoint
# (exported as a bf16 graph)
VARIANTS = {
    "llama_k128": ("llama", dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=8)),
    "qwen2_k128": ("qwen2", dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4)),
    "llama_bf16": ("llama", dict(dtype="bfloat16")),
}
FEATURE_FAMILIES = ("llama_k128", "qwen2_k128", "llama")  # every feature case on each of these, every target
VLM_FAMILIES = ("qwen2_5_vl", "qwen3_vl")
DONE = ".complete"


def _patterns_from_this_checkout() -> None:
    """`onnx_rewriter.patterns` is the top-level `patterns/` folder, mapped in by the (editable) install:
    take the one beside the imported `onnx_rewriter`, so that PYTHONPATH=CHECKOUT runs that checkout's."""
    import importlib.util

    import onnx_rewriter

    root = Path(onnx_rewriter.__file__).resolve().parent.parent / "patterns"
    if (root / "__init__.py").is_file() and "onnx_rewriter.patterns" not in sys.modules:
        spec = importlib.util.spec_from_file_location("onnx_rewriter.patterns", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["onnx_rewriter.patterns"] = module
        spec.loader.exec_module(module)


def _feature_cases(work: Path) -> dict[str, list[str]]:
    corpus = work / "corpus.txt"
    corpus.write_text("The capital of France is Paris. A spider has eight legs.\n")
    keep = work / "keep.txt"
    keep.write_text("\n".join(str(i) for i in range(40, 90)) + "\n")
    return {
        "int4": ["--quantize", "int4"],
        "int4-v1": ["--quantize", "int4", "--int4-plugin-version", "1"],
        "int4-awq": ["--quantize", "int4", "--int4-method", "awq"],
        "fp8kv": ["--kv-cache", "fp8"],
        "lora": ["--lora"],
        "vocab-corpus": ["--reduce-vocab", "--vocab-corpus", str(corpus), "--vocab-multiple", "8"],
        "vocab-keep": ["--reduce-vocab", "--keep-tokens", str(keep)],
        "int4+lora+fp8kv": ["--quantize", "int4", "--lora", "--kv-cache", "fp8"],
        "fp32-fp8kv": ["--kv-cache", "fp8", "--dtype", "float32"],
        "int4-v2": ["--quantize", "int4", "--int4-plugin-version", "2"],
        "awq-no-int4": ["--int4-method", "awq"],
        "scales-no-fp8": ["--kv-scales", str(work)],
        "vocab-no-reduce": ["--vocab-multiple", "8"],
        "external-data": ["--external-data"],
        "no-tokenizer": ["--no-tokenizer"],
    }


def _cli(argv: list[str], keep_stdout: bool = False) -> tuple[int, str]:
    """Run the command line in this process; returns (exit code, last `error:` line or '')."""
    from onnx_rewriter.cli import main

    err, out = io.StringIO(), io.StringIO()
    quiet = contextlib.nullcontext() if keep_stdout else contextlib.redirect_stdout(out)
    with contextlib.redirect_stderr(err), quiet:
        rc = main(argv + ["-q"])
    if rc == 130:  # Ctrl-C / SIGTERM, which the CLI turns into "interrupted": stop the run, not one case
        raise SystemExit("interrupted")
    errors = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
    return rc, (errors[-1] if errors else "")


def _hashes(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _build_checkpoint(family: str, path: Path, vlm: bool = False) -> Path:
    if (path.parent / (path.name + DONE)).is_file():
        return path
    import importlib

    names = (["onnx_rewriter.hf.tiny_vlm", "tests.support.tiny_vlm"] if vlm
             else ["onnx_rewriter.hf.tiny", "tests.support.tiny"])
    for name in names:  # wherever this checkout keeps the fixture
        try:
            mod = importlib.import_module(name)
            break
        except ImportError:
            continue
    else:
        raise SystemExit(f"no tiny-checkpoint builder found ({', '.join(names)}); "
                         "build the baselines with another checkout")
    shutil.rmtree(path, ignore_errors=True)
    if vlm:
        mod.build_vlm_checkpoint(family, path)
    else:
        name, kw = VARIANTS.get(family, (family, {}))
        mod.build_checkpoint(name, path, **kw)
    (path.parent / (path.name + DONE)).touch()
    return path


def _baseline(family: str, root: Path, work: Path, vlm: bool = False) -> Path:
    """root/base/FAMILY: the `export --keep-baseline` folder (model.onnx, config.json, tokenizer)."""
    base = root / "base" / family
    if (base.parent / (family + DONE)).is_file():
        return base / "model.onnx"
    ckpt = _build_checkpoint(family, root / "ckpt" / family, vlm)
    shutil.rmtree(base, ignore_errors=True)
    base.parent.mkdir(parents=True, exist_ok=True)
    rc, err = _cli(["export", "--model", str(ckpt), "--output-dir", str(work / f"keep-{family}"),
                    "--keep-baseline", str(base)])
    if rc:
        raise SystemExit(f"baseline export of {family} failed ({rc}): {err}")
    (base.parent / (family + DONE)).touch()
    return base / "model.onnx"


def run(args) -> int:
    _patterns_from_this_checkout()
    root = Path(args.baselines).resolve()
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="outputs_digest_"))
    cases: dict[str, dict] = {}
    t0 = time.perf_counter()

    def case(name: str, argv: list[str], out: Path) -> None:
        t = time.perf_counter()
        rc, err = _cli(argv)
        cases[name] = {"files": _hashes(out)} if rc == 0 else {"exit": rc, "error": err}
        shutil.rmtree(out, ignore_errors=True)
        print(f"{time.perf_counter() - t0:6.1f}s  {name}: {'ok' if rc == 0 else err[:100]}"
              f" ({time.perf_counter() - t:.1f}s)", flush=True)

    try:
        families = args.families.split(",") if args.families else list(FAMILIES) + list(VARIANTS)
        bases = {f: _baseline(f, root, work) for f in families}
        for f in VLM_FAMILIES:
            _build_checkpoint(f, root / "ckpt" / f, vlm=True)
            bases[f] = _baseline(f, root, work, vlm=True)
        print(f"{time.perf_counter() - t0:6.1f}s  baselines ready in {root}", flush=True)
        n = 0
        for fam, base in bases.items():
            for target in TARGETS:
                for dt in DTYPES:
                    n += 1
                    out = work / f"o{n}"
                    case(f"rewrite/{fam}/{target}/{dt}", [str(base), str(out), "--target", target, "--dtype", dt], out)
        for fam in FEATURE_FAMILIES:
            for feat, extra in _feature_cases(work).items():
                for target in TARGETS:
                    n += 1
                    out = work / f"o{n}"
                    case(f"feature/{fam}/{feat}/{target}", [str(bases[fam]), str(out), "--target", target] + extra,
                         out)
        base = str(bases["llama"])
        usage = {  # refusals of the command line and the Python API: exit code and message
            "bad-target": [base, str(work / "u"), "--target", "edgellm-9"],
            "bad-dtype": [base, str(work / "u"), "--dtype", "bfloat16"],
            "bad-quantize": [base, str(work / "u"), "--quantize", "int8"],
            "bad-kv-cache": [base, str(work / "u"), "--kv-cache", "fp4"],
            "bad-plugin-version": [base, str(work / "u"), "--quantize", "int4", "--int4-plugin-version", "3"],
            "bad-int4-method": [base, str(work / "u"), "--quantize", "int4", "--int4-method", "gptq"],
            "no-output": [base],
            "unknown-flag": [base, str(work / "u"), "--quantise", "int4"],
            "export-no-model": ["export", "--output-dir", str(work / "u")],
            "inspect-bad-target": ["inspect", base, "--target", "x"],
            "verify-no-source": ["verify", str(work / "u")],
            "missing-corpus": [base, str(work / "u"), "--reduce-vocab", "--vocab-corpus", str(work / "none.txt")],
            "reduce-no-corpus": [base, str(work / "u"), "--reduce-vocab"],
            "calibration-missing": [base, str(work / "u"), "--calibration", str(work / "none.txt")],
        }
        for name, argv in usage.items():
            rc, err = _cli(argv)
            cases[f"usage/{name}"] = {"exit": rc, "error": err.replace(str(work), "WORK")}
        import onnx_rewriter

        for name, kw in {"unknown": dict(quantise="int4"), "bad-quantize": dict(quantize="int8"),
                         "bad-target": dict(target="x"), "bad-method": dict(quantize="int4", int4_method="x"),
                         "int4": dict(quantize="int4", target="edgellm-0.11")}.items():
            out = work / "api"
            try:
                onnx_rewriter.rewrite(str(bases["llama"]), str(out), **kw)
                cases[f"api/{name}"] = {"files": _hashes(out)}
            except Exception as exc:  # noqa: BLE001 - the refusal is what is compared
                cases[f"api/{name}"] = {"exit": type(exc).__name__, "error": str(exc)}
            shutil.rmtree(out, ignore_errors=True)
        for fam in ("llama", "qwen2_5_vl"):  # what `inspect` prints (no times in it)
            for target in TARGETS:
                t = time.perf_counter()
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    rc, err = _cli(["inspect", str(bases[fam]), "--target", target], keep_stdout=True)
                cases[f"inspect/{fam}/{target}"] = {"exit": rc, "error": err,
                                                    "stdout": hashlib.sha256(out.getvalue().encode()).hexdigest()}
                print(f"{time.perf_counter() - t0:6.1f}s  inspect/{fam}/{target}: {rc}"
                      f" ({time.perf_counter() - t:.1f}s)")
        for fam in (("llama",) + VLM_FAMILIES):  # the export routes trace the checkpoint again each time
            for target in (("edgellm-0.9", "edgellm-0.11") if fam in VLM_FAMILIES else ("edgellm-0.9",)):
                n += 1
                out = work / f"o{n}"
                case(f"export/{fam}/{target}", ["export", "--model", str(root / "ckpt" / fam), "--output-dir",
                                                str(out), "--target", target], out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(json.dumps({"cases": cases}, indent=1, sort_keys=True) + "\n")
    files = sum(len(c.get("files", {})) for c in cases.values())
    print(f"{len(cases)} cases, {files} files hashed in {time.perf_counter() - t0:.0f}s: {args.out}")
    return 0


def compare(args) -> int:
    a = json.loads(Path(args.a).read_text())["cases"]
    b = json.loads(Path(args.b).read_text())["cases"]
    equal, differ = 0, []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            differ.append(f"{name}: only in {'after' if name not in a else 'before'}")
            continue
        ca, cb = a[name], b[name]
        if "files" not in ca or "files" not in cb:
            if ca == cb:
                equal += 1
            else:
                differ.append(f"{name}: {ca.get('error') or 'ok'} -> {cb.get('error') or 'ok'}")
            continue
        fa, fb = ca["files"], cb["files"]
        for f in sorted(set(fa) | set(fb)):
            if fa.get(f) == fb.get(f):
                equal += 1
            else:
                differ.append(f"{name}/{f}: {'missing' if f not in fa else fa[f][:12]} -> "
                              f"{'missing' if f not in fb else fb[f][:12]}")
    refusals = sum(1 for c in a.values() if "files" not in c)
    print(f"{len(a)} cases ({refusals} refusals compared by message): {equal} files/refusals equal, "
          f"{len(differ)} differing")
    for line in differ:
        print("  " + line)
    return 1 if differ else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="build/reuse baselines, rewrite the matrix, write the digest JSON")
    r.add_argument("--baselines", required=True, metavar="DIR", help="checkpoints and baseline exports (cached)")
    r.add_argument("--out", required=True, metavar="FILE", help="digest JSON to write")
    r.add_argument("--families", help=f"comma list (default {','.join(FAMILIES)})")
    c = sub.add_parser("compare", help="compare two digest JSONs file by file")
    c.add_argument("a")
    c.add_argument("b")
    args = p.parse_args(argv)
    return run(args) if args.cmd == "run" else compare(args)


if __name__ == "__main__":
    sys.exit(main())
