"""Can the suite fail? Deliberate bugs in the rewriter, one at a time: the fast subset below must fail on each.

Each mutant is exact text replaced in a copy of the repository (tracked and untracked, not ignored,
files); the copy runs SUBSET with PYTHONPATH pointing at it. The unmutated copy runs first and must
pass, so a mutant's failures are its own. Exports do not depend on the rewriter: they are built once
and shared by every run (ONNX_REWRITER_TEST_MODELS).

    python tests/mutants.py [--only NAME ...] [--write docs/mutants.md]      (make mutants)

Exit code 0 when every mutant is caught, 1 when one survives (or the control run fails).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Fast tests that reach the plugin attributes, the probe, the baked RoPE table and the scale: ~1/10 of the suite.
SUBSET = [
    "tests/test_mask_probe.py",
    "tests/reference/test_int4.py",
    "tests/test_verify.py::test_dropped_window_fails_verify",
    "tests/targets/test_targets.py::test_paged_non_default_scale_is_the_attribute",
    "tests/test_coverage.py::test_rewritten_and_verified[llama-float32]",
    "tests/test_coverage.py::test_rewritten_and_verified[mistral_window-float32]",
    "tests/test_coverage.py::test_rewritten_and_verified[gemma3-float32]",
]


@dataclass
class Mutant:
    name: str
    path: str  # relative to the repository root
    edits: list  # (exact old text, new text); each old text must occur exactly once


MUTANTS = [
    Mutant("mask probe always answers causal", "onnx_rewriter/analysis/mask_probe.py", [
        ("        if np.array_equal(allowed, causal) or (0 < w < s and",
         "        if True or (0 < w < s and"),
        ("            w = None if np.array_equal(allowed, causal) else w", "            w = None")]),
    Mutant("baked RoPE table halves swapped (sin before cos)", "onnx_rewriter/targets/base.py", [
        ("    table = np.concatenate([np.cos(f), np.sin(f)], axis=-1)",
         "    table = np.concatenate([np.sin(f), np.cos(f)], axis=-1)")]),
    Mutant("sliding window off by one", "onnx_rewriter/targets/base.py", [
        ('"sliding_window_size": layer.sliding_window if layer.sliding_window else -1,',
         '"sliding_window_size": layer.sliding_window + 1 if layer.sliding_window else -1,')]),
    Mutant("non-default scale dropped (dense: q not pre-scaled)", "onnx_rewriter/targets/base.py", [
        ("    factor = layer.scale / layer.default_scale", "    factor = 1.0")]),
    Mutant("non-default scale dropped (paged: default attention_scale)", "onnx_rewriter/targets/edgellm_011.py", [
        ('"attention_scale": float(layer.scale),', '"attention_scale": float(layer.default_scale),')]),
    Mutant("k and v swapped at the plugin", "onnx_rewriter/targets/edgellm_09.py", [
        ("        return [q, k, v]", "        return [q, v, k]")]),
    Mutant("INT4 V1 nibble order flipped in the packer", "onnx_rewriter/features/int4/layout.py", [
        ("    words = tuples[..., 0] | tuples[..., 1] << 4 |", "    words = tuples[..., 1] | tuples[..., 0] << 4 |")]),
]


def copy_repo(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    # The editable install maps onnx_rewriter.patterns to ROOT/patterns: point the copy at its own.
    (dst / "onnx_rewriter" / "patterns").symlink_to("../patterns")


def apply(repo: Path, mutant: Mutant) -> None:
    path = repo / mutant.path
    text = path.read_text()
    for old, new in mutant.edits:
        if text.count(old) != 1:
            raise SystemExit(f"mutant '{mutant.name}': {old!r} occurs {text.count(old)} times in {mutant.path}; "
                             f"update tests/mutants.py to the current source")
        text = text.replace(old, new)
    path.write_text(text)


def run_subset(repo: Path, models: Path) -> tuple[list[str], str, float]:
    """(ids of failed tests, pytest's summary line, seconds)."""
    env = dict(os.environ, PYTHONPATH=str(repo), ONNX_REWRITER_TEST_MODELS=str(models))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *SUBSET],
                          cwd=repo, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t0
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    return failed, summary, took


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="run only mutants whose name contains one of these words")
    ap.add_argument("--write", help="write the result table (markdown) to this file")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or any(w in m.name for w in args.only)]
    rows, survived = [], 0
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        tmp, models = Path(tmp), Path(tmp) / "models"
        control = tmp / "control"
        copy_repo(control)
        probe = subprocess.run([sys.executable, "-c", "import onnx_rewriter.patterns as p; print(p.__file__)"],
                               cwd=control, env=dict(os.environ, PYTHONPATH=str(control)), capture_output=True,
                               text=True).stdout.strip()
        if not probe.startswith(str(control)):
            raise SystemExit(f"the copy imports the package from {probe}, not from itself")
        failed, summary, took = run_subset(control, models)
        print(f"control (no mutation): {summary} [{took:.0f} s]", flush=True)
        if failed or " passed" not in summary:
            print("the unmutated suite subset fails; fix that first:\n" + "\n".join(failed))
            return 1
        for k, mutant in enumerate(chosen):
            repo = tmp / f"m{k}"
            copy_repo(repo)
            apply(repo, mutant)
            failed, summary, took = run_subset(repo, models)
            survived += not failed
            caught = ", ".join(f.removeprefix("tests/") for f in failed) or "**none: SURVIVED**"
            rows.append((mutant.name, mutant.path, caught, took))
            print(f"{mutant.name}: {summary} [{took:.0f} s]\n    caught by: {caught}", flush=True)
            shutil.rmtree(repo)
    total = time.perf_counter() - t_all
    table = ["| deliberate bug | file | tests that failed | s |", "|---|---|---|---|"]
    table += [f"| {n} | `{p}` | {c} | {t:.0f} |" for n, p, c, t in rows]
    verdict = (f"{len(rows) - survived} of {len(rows)} mutants caught"
               f"{'' if not survived else f', {survived} SURVIVED'}; {total:.0f} s in all (control run included)")
    print("\n" + "\n".join(table) + "\n\n" + verdict)
    if args.write:
        Path(args.write).write_text(
            "# Mutation check of the test suite\n\n"
            "`make mutants` (tests/mutants.py) puts one deliberate bug at a time into a copy of the rewriter and\n"
            "runs a fast subset of the suite on it; every bug must make at least one test fail. Subset:\n\n"
            + "".join(f"- `{t}`\n" for t in SUBSET)
            + f"\nLast run: {time.strftime('%Y-%m-%d', time.gmtime())}, `make mutants`, 2 shared CPU cores.\n\n"
            + "\n".join(table) + f"\n\n{verdict}.\n")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
