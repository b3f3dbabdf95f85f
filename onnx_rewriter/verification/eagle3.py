"""`verify` for EAGLE3 folders (features/eagle3.py) on the CPU reference, against transformers.

- base: the `hidden_states` output of a prefill against transformers' `hidden_states[i]` (the residual stream
  entering layer i) for the folder's `eagle_hidden_state_layers`, and the logits of every row;
- draft (with `--eagle-draft DIR`, the draft checkpoint): its log-probs and hidden rows against the torch draft
  (hf/eagle3_draft.py) fed the same tokens and the same base hidden states (transformers' taps);
- speculative greedy decoding (reference/eagle.py) of `new_tokens` tokens on each prompt must give exactly
  transformers' greedy tokens of the base, and each logits row that chose a token must match transformers' row
  at that position; the mean accepted length (tokens committed per base call) is printed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from ..errors import RewriteError
from ..modelio.config_file import read_config
from ..reference.eagle import DEPTH, TOP_K, VERIFY_SIZE, speculative_greedy
from ..reference.runner import Session
from .compare import FP16_COSINE, StepResult, compare

NEW_TOKENS = 32


def is_eagle_folder(out_dir) -> str | None:
    """'base', 'draft', 'pair' (a folder holding base/ and draft/) or None."""
    out = Path(out_dir)
    if (out / "base" / "config.json").is_file() and (out / "draft" / "config.json").is_file():
        return "pair"
    if not (out / "config.json").is_file():
        return None
    try:
        cfg = read_config(out / "config.json")
    except RewriteError:
        return None
    role = cfg.get("engine_role") or {"eagle3_base": "base", "eagle3_draft": "draft"}.get(cfg.get("model_type"))
    return role if role in ("base", "draft") else None


@dataclass
class EagleResult:
    checks: list[StepResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    mean_accepted: list[float] = field(default_factory=list)
    passed: bool = False
    criterion: str = ""


def _taps(model, ids, layers):
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    hs = out.hidden_states
    taps = torch.cat([hs[i][0] for i in layers], dim=-1).float().numpy()
    return taps, out.logits[0].float().numpy()


def _greedy(model, prompt, n):
    import torch

    seq, rows = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1].float().numpy()
            rows.append(logits)
            seq.append(int(np.argmax(logits)))
    return seq[len(prompt):], rows


def _close(result, name, ours, ref) -> None:
    s = compare(name, np.asarray(ours, np.float32).reshape(-1), np.asarray(ref, np.float32).reshape(-1))
    result.checks.append(s)


def verify_eagle3(out_dir, model: str, draft_checkpoint: str | None = None, new_tokens: int = NEW_TOKENS,
                  prompts=None, quiet: bool = False, top_k: int = TOP_K, depth: int = DEPTH,
                  verify_size: int = VERIFY_SIZE, positions_offset: int = 0) -> EagleResult:
    from ..hf.eagle3_draft import load_draft, read_draft_config, target_layer_ids
    from ..hf.export import load_model

    kind = is_eagle_folder(out_dir)
    out = Path(out_dir)
    base_dir = out / "base" if kind == "pair" else out
    if kind == "draft":
        raise RewriteError(f"'{out_dir}' is an EAGLE3 draft folder; verify the folder holding base/ and draft/ "
                           f"(export --eagle-draft writes it) with --eagle-draft DRAFT_CHECKPOINT")
    if kind == "pair" and draft_checkpoint is None:
        raise RewriteError(f"'{out_dir}' holds an EAGLE3 base and draft; give the draft checkpoint: --eagle-draft DIR")
    result = EagleResult()
    hf, _ = load_model(model)
    base = Session(base_dir)
    layers = [int(i) for i in base.config.get("eagle_hidden_state_layers") or []]
    vocab = int(base.config["vocab_size"])
    rng = np.random.default_rng(0)
    prompts = prompts or [rng.integers(3, vocab, 11).tolist(), rng.integers(3, vocab, 6).tolist()]
    if len(layers) != 3:
        result.problems.append(f"base config.json: eagle_hidden_state_layers {layers} is not 3 layers")
        return _finish(result, quiet)

    # base: taps and logits of a prefill
    from ..reference.eagle import tree_runner

    p = prompts[0]
    logits, hidden = tree_runner(base, len(p) + 4).call(p, len(p), None, np.arange(len(p)))
    taps, ref_logits = _taps(hf, p, layers)
    _close(result, "base prefill logits", logits, ref_logits)
    _close(result, f"base hidden_states (layers {layers})", hidden, taps)

    if kind == "pair":
        dcfg = read_draft_config(draft_checkpoint)
        trained = target_layer_ids(dcfg)
        if trained is not None and trained != layers:
            result.problems.append(f"the base taps layers {layers}, the draft was trained on {trained}")
        emb = hf.get_input_embeddings().weight.detach().float()
        torch_draft = load_draft(draft_checkpoint, base_embedding=emb)
        draft = Session(out / "draft", embedding=base.embedding)
        d2t = load_file(str(out / "draft" / "d2t.safetensors"))["d2t"].astype(np.int64)
        _check_draft(result, draft, torch_draft, p, int(np.argmax(ref_logits[-1])), taps)
        for i, prompt in enumerate(prompts):
            spec = speculative_greedy(base, draft, d2t, prompt, new_tokens, top_k=top_k, depth=depth,
                                      verify_size=verify_size,
                                      positions_offset=positions_offset)
            want, rows = _greedy(hf, prompt, new_tokens)
            if spec.tokens != want:
                k = next(j for j, (a, b) in enumerate(zip(spec.tokens, want)) if a != b)
                result.problems.append(f"prompt {i}: speculative greedy token {k} is {spec.tokens[k]}, transformers' "
                                       f"greedy {want[k]}")
            worst = min((compare("", np.asarray(a, np.float32), b) for a, b in zip(spec.rows, rows)),
                        key=lambda s: s.cosine)
            worst.step = f"prompt {i}: {new_tokens} speculative tokens, worst row"
            result.checks.append(worst)
            result.mean_accepted.append(spec.mean_accepted)
    return _finish(result, quiet)


def _check_draft(result, draft, torch_draft, prompt, nxt, taps) -> None:
    import torch

    n = len(prompt)
    ids = list(prompt[1:]) + [nxt]
    from ..reference.eagle import tree_runner

    h = int(draft.config["hidden_size"])
    logp, hid = tree_runner(draft, n + 4).call(
        ids, n, None, np.arange(n), extra={"hidden_states_input": taps[None].astype(draft.float),
                                           "hidden_states_from_draft": np.zeros((1, n, h), draft.float)})
    with torch.no_grad():
        t = torch.tensor([ids])
        lg, th = torch_draft(t, torch.ones_like(t), torch.from_numpy(taps)[None], torch.zeros(1, n, h))
        ref_logp = torch.log_softmax(lg[0].float(), -1).numpy()
    _close(result, "draft log-probs", logp, ref_logp)
    _close(result, "draft hidden_states", hid, th[0].numpy())


def _finish(result: EagleResult, quiet: bool) -> EagleResult:
    ok = all(s.cosine >= FP16_COSINE and np.isfinite(s.max_abs) for s in result.checks)
    result.passed = ok and not result.problems
    result.criterion = (f"fp16: cosine >= {FP16_COSINE} for every compared tensor; speculative greedy tokens equal "
                        f"transformers' greedy tokens")
    if not quiet:
        print_eagle(result)
    return result


def print_eagle(result: EagleResult, out=None) -> None:
    out = out or sys.stdout
    for s in result.checks:
        print(f"{s.step:<55} cosine {s.cosine:.6f}  max|diff| {s.max_abs:.4g}", file=out)
    for m in result.problems:
        print(f"FAIL: {m}", file=out)
    for i, a in enumerate(result.mean_accepted):
        print(f"prompt {i}: mean accepted length {a:.2f} tokens per base call", file=out)
    print(f"verify {'PASSED' if result.passed else 'FAILED'} ({result.criterion})", file=out)
