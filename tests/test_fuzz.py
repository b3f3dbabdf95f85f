"""Fuzzing: mutated real baselines must be refused cleanly or rewritten into a graph that still computes
what the (mutated) baseline computes.

Each case applies one deterministic mutation (tests/fuzz_mutations.py) to the tiny llama or qwen2
baseline, rewrites it (fp32, so precision cannot mask or fake a difference) and, when the rewrite
succeeds and the mutated baseline itself runs in onnxruntime, verifies it against that baseline.
Outcomes: refused (a one-line RewriteError), verified, baseline-invalid (the mutated baseline does not
run: then only "no crash" is checked). Anything else is a failure: a crash, a multi-line message, or a
wrong graph.

CI runs FUZZ_CASES (default 200) cases; `--runslow` runs 2000; the env var ONNX_REWRITER_FUZZ_CASES
sets any count, ONNX_REWRITER_FUZZ_SEED shifts the seeds.
"""

from __future__ import annotations

import os
import shutil
import traceback
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_rewriter import pipeline
from onnx_rewriter.errors import RewriteError
from onnx_rewriter.reference.verify import prompts, verify
from onnx_rewriter.spec import runtime_rope_layer

from .fuzz_mutations import mutate

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # overflow in mutated graphs

FAMILIES = ("llama", "qwen2")
# A wrong fusion (RoPE, mask, scale, heads) moves logits by 1e-1 and more; mutated graphs may amplify
# fp32 rounding (ORT vs the numpy reference) past verify's own 1e-4, so the fuzzer allows 1e-3.
FP32_REL = 1e-3
STEPS = 2


def case_count(config) -> int:
    env = os.environ.get("ONNX_REWRITER_FUZZ_CASES")
    if env:
        return int(env)
    return 2000 if config.getoption("--runslow") else 200


@pytest.fixture(scope="module")
def bases(models):
    """Each family's baseline as bytes: weights inline, shapes inferred (the mutators pick by type)."""
    out = {}
    for fam in FAMILIES:
        m = onnx.load(str(models.baseline(fam)))
        out[fam] = onnx.shape_inference.infer_shapes(m).SerializeToString()
    return out


def baseline_runs(path, vocab: int) -> bool:
    """Is the mutated baseline still a causal LM? It must run on the token counts verify feeds it, with
    finite logits, and a token's logits must not depend on later tokens (a mutation that mixes tokens
    outside attention, e.g. a dropped head Transpose, makes a graph no KV cache can reproduce)."""
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        long, short = prompts(vocab)
        outs = {}
        for n in (len(short), len(short) + STEPS, len(long), len(long) + STEPS):
            ids = np.asarray([(long * 2)[:n]], dtype=np.int64)
            feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            out = sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]
            if out.shape[:2] != (1, n) or not np.all(np.isfinite(out)):
                return False
            outs[n] = out[0]
        # rows of a batch must not interact either (verify batches its rows; the oracle runs each alone)
        n = len(short)
        ids = np.asarray([(long * 2)[:n], short], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        both = sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]
        ids = ids[1:]
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        alone = sess.run(None, {k: v for k, v in feeds.items() if k in names})[0][0]
    except Exception:
        return False
    lens = sorted(outs)
    pairs = [(outs[lens[0]], outs[lens[-1]][: lens[0]]),  # the same prefix, with and without later tokens
             (both[0], outs[n]), (both[1], alone)]
    return all(np.abs(a - b).max() <= FP32_REL * max(np.abs(a).max(), 1e-6) for a, b in pairs)


def own_rope_table(run, positions: int = 512) -> np.ndarray:
    """The table of the frequencies the graph uses, for runs warned that the runtime ignores their scaling."""
    ref = runtime_rope_layer(run.layers)
    inv = np.asarray(ref.rope.inv_freq, dtype=np.float32)
    f = np.arange(positions, dtype=np.float32)[:, None] * inv[None, :]
    return (np.concatenate([np.cos(f), np.sin(f)], axis=-1) * np.float32(ref.rope.attention_scaling))


def run_case(base: bytes, seed: int, folder) -> tuple[str, str, str]:
    """(outcome, mutation, detail) of one case."""
    model = onnx.ModelProto.FromString(base)
    vocab = next(t for t in model.graph.initializer if "embed_tokens" in t.name).dims[0]
    desc = mutate(model, seed)
    del model.graph.value_info[:]  # stale after the mutation; the rewriter infers its own
    folder.mkdir(parents=True)
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    valid = baseline_runs(path, vocab)
    try:
        run = pipeline.rewrite(path, folder / "out", dtype="float32")
    except RewriteError as exc:
        msg = str(exc)
        if not msg.strip() or "\n" in msg:
            return "FAIL: message not one line", desc, repr(msg)
        return ("baseline-invalid (refused)" if not valid else "refused"), desc, msg
    except Exception:
        return "FAIL: crash", desc, traceback.format_exc(limit=-6)
    if not valid:
        return "baseline-invalid (rewritten)", desc, ""
    scaled = any("frequencies are scaled" in w for w in run.report.warnings)
    try:
        res = verify(folder / "out", baseline=str(path), steps=STEPS, quiet=True,
                     rope=own_rope_table(run) if scaled else "runtime")
    except Exception:
        return "FAIL: verify crashed", desc, traceback.format_exc(limit=-6)
    # fp32: same numbers, same top-1 unless the oracle's own top-2 are closer than the error
    ok = all(s.rel <= FP32_REL and (s.top1_agree or not s.top1_checked) for s in res.steps)
    if not ok:
        return "FAIL: wrong graph", desc, res.table()
    return ("verified (scaled RoPE)" if scaled else "verified"), desc, ""


def test_fuzz_mutated_baselines(bases, tmp_path, request):
    n = case_count(request.config)
    seed0 = int(os.environ.get("ONNX_REWRITER_FUZZ_SEED", "0"))
    counts: Counter = Counter()
    failures = []
    for k in range(n):
        fam = FAMILIES[k % len(FAMILIES)]
        seed = seed0 + k
        folder = tmp_path / f"{fam}-{seed}"
        outcome, desc, detail = run_case(bases[fam], seed, folder)
        counts[outcome] += 1
        if outcome.startswith("FAIL"):
            failures.append(f"[{fam} seed {seed}] {outcome}: {desc}\n{detail}")
        shutil.rmtree(folder, ignore_errors=True)
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    print(f"\nfuzz: {n} cases: {summary}")
    request.node.user_properties.append(("fuzz", dict(counts)))
    assert not failures, f"{len(failures)} of {n} cases failed ({summary}):\n\n" + "\n\n".join(failures[:10])
    assert counts["verified"] + counts["verified (scaled RoPE)"] > 0 and counts["refused"] > 0
