"""Reduced output vocabulary (`--reduce-vocab`): lm_head keeps only the tokens a corpus or a list needs.

The runtime reads `vocab_map.safetensors` (`{"vocab_map": int32 [R]}`, unique, ascending, < V) and
config.json's `reduced_vocab_size` = R; `vocab_size` stays V. Only lm_head changes: its weight becomes
the kept rows (`[H, R]` as our MatMul holds it), so `logits` is `[..., R]` and the runtime maps sampled
index i back to token `vocab_map[i]`. The embedding table stays whole; a tied head gets its own cut copy
(a new constant; the embedding is written from the untouched table).

Always kept, whatever the corpus: the tokenizer's special tokens (bos, eos, pad, unk and every added
token marked special), every `eos_token_id` of config.json and generation_config.json, and the tokens of
the chat template's role prefixes, suffixes, generation prompts and default system prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_rewriter.features.base import Feature, FeatureOptions, option

from ..errors import RewriteError, UnsupportedModel
from ..modelio.config_file import read_config
from ..modelio.graph import computed_constant, constant_array
from ..reference.vocab_map import MAP_FILE
from ..sidefiles.chat_template import processed_chat_template
from ..sidefiles.tokenizer import load_tokenizer
from ..sidefiles.writer import tokenizer_dir
from ..targets.base import lm_head_input

# Runtime 0.5 already honours reduced_vocab_size; every target cuts lm_head alike (contract §12).
TARGETS = ("edgellm-0.5", "edgellm-0.9", "edgellm-0.10", "edgellm-0.11")


@dataclass
class ReducedVocabOptions(FeatureOptions):
    reduce_vocab: bool = option(False, "--reduce-vocab", "cut lm_head to the tokens of --vocab-corpus / "
                                "--keep-tokens plus the special, EOS and chat-template tokens (writes "
                                "vocab_map.safetensors)", action="store_true")
    vocab_corpus: list | None = option(None, "--vocab-corpus", "text files whose tokens the reduced vocabulary "
                                       "keeps (tokenized with the model's tokenizer)", nargs="+", metavar="FILE")
    keep_tokens: str | Path | None = option(None, "--keep-tokens", "a file of token ids the reduced vocabulary keeps",
                                            metavar="FILE")
    vocab_multiple: int | None = option(None, "--vocab-multiple", "pad the reduced vocabulary to a multiple of N",
                                        type=int, metavar="N")

    def enabled(self) -> bool:
        return bool(self.reduce_vocab)

    def validate(self, target, options) -> None:
        corpus = list(self.vocab_corpus or [])
        if not self.reduce_vocab:
            for flag, value in (("--vocab-corpus", corpus), ("--keep-tokens", self.keep_tokens),
                                ("--vocab-multiple", self.vocab_multiple)):
                if value:
                    raise RewriteError(f"{flag} needs --reduce-vocab")
            return
        if not corpus and not self.keep_tokens:
            raise RewriteError("--reduce-vocab needs the tokens to keep: --vocab-corpus FILE... and/or --keep-tokens "
                               "FILE")
        for f in corpus + ([self.keep_tokens] if self.keep_tokens else []):
            if not Path(f).is_file():
                raise RewriteError(f"'{f}' is not a file; give text files (--vocab-corpus) or a file of token ids "
                                   f"(--keep-tokens)")
        # an empty file would keep only the special tokens, silently: refused like an empty --calibration
        for f in corpus:
            if not _read_text(f).strip():
                raise RewriteError(f"--vocab-corpus '{f}' holds no text; give text files whose tokens the reduced "
                                   f"vocabulary keeps")
        if self.keep_tokens and not _uncommented(_read_text(self.keep_tokens)).strip(" \t\r\n,"):
            raise RewriteError(f"--keep-tokens '{self.keep_tokens}' holds no token id; give integers (one per line "
                               f"or separated by commas)")
        m = self.vocab_multiple
        if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 1):
            raise RewriteError(f"--vocab-multiple {m!r}: give a positive integer (e.g. 64)")

    def feature(self, options) -> ReducedVocab:
        return ReducedVocab(self.vocab_corpus, self.keep_tokens, self.vocab_multiple)


def _read_text(path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RewriteError(f"cannot read '{path}' as UTF-8 text ({exc}); give plain text files") from None


def _uncommented(text: str) -> str:
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def read_token_ids(path, vocab: int) -> list[int]:
    """Token ids separated by whitespace or commas; `#` starts a comment."""
    text = _uncommented(_read_text(path))
    ids = []
    for word in re.split(r"[\s,]+", text.strip()):
        if not word:
            continue
        if not re.fullmatch(r"\d+", word):
            raise RewriteError(f"--keep-tokens '{path}': '{word}' is not a token id; give integers (one per line "
                               f"or separated by commas)")
        if int(word) >= vocab:
            raise RewriteError(f"--keep-tokens '{path}': token id {word} is outside the vocabulary (size {vocab})")
        ids.append(int(word))
    return ids


def eos_ids(folders) -> set[int]:
    """`eos_token_id` (an int or a list) of every config.json / generation_config.json in `folders`."""
    out: set[int] = set()
    for folder in folders:
        for name in ("config.json", "generation_config.json"):
            path = Path(folder) / name
            if not path.is_file():
                continue
            try:
                cfg = read_config(path)
            except RewriteError:
                continue
            for c in (cfg, cfg.get("text_config") or {}):
                value = c.get("eos_token_id")
                out.update(int(v) for v in (value if isinstance(value, list) else [value]) if isinstance(v, int))
    return out


def special_ids(tok) -> set[int]:
    """bos/eos/pad/unk and every added token marked special (eos falls back to pad, as NVIDIA's selection)."""
    ids = {int(i) for i in tok.all_special_ids if i is not None}
    ids.update(int(i) for i, t in getattr(tok, "added_tokens_decoder", {}).items() if getattr(t, "special", False))
    return ids


def chat_template_ids(tok) -> set[int]:
    """Tokens of the chat template's fixed strings (role prefixes/suffixes, prompts, default system)."""
    if not getattr(tok, "chat_template", None):
        return set()
    try:
        t = processed_chat_template(tok)
    except Exception as exc:  # the template is the tokenizer side files' to refuse; here it only adds tokens
        raise RewriteError(f"--reduce-vocab: cannot read the chat template's role tokens ({exc})") from None
    texts = [s for role in t["roles"].values() for s in role.values()]
    texts += [t.get("generation_prompt", ""), t.get("generation_prompt_thinking", ""),
              t.get("default_system_prompt", "")]
    return {int(i) for s in texts if s for i in tok(s, add_special_tokens=False)["input_ids"]}


def select(tok, vocab: int, corpus, keep_file, eos_folders, multiple: int | None) -> tuple[np.ndarray, dict]:
    """The sorted kept ids and where each group came from."""
    groups = {
        "corpus": {int(i) for f in corpus for i in tok(_read_text(f), add_special_tokens=False)["input_ids"]},
        "keep_tokens": set(read_token_ids(keep_file, vocab)) if keep_file else set(),
        "special": special_ids(tok),
        "eos": eos_ids(eos_folders) | ({int(tok.eos_token_id)} if tok.eos_token_id is not None else set()),
        "chat_template": chat_template_ids(tok),
    }
    outside = sorted(i for g in ("special", "eos") for i in groups[g] if not 0 <= i < vocab)
    if outside:
        raise UnsupportedModel(f"--reduce-vocab: token id {outside[0]} (special or EOS) is outside the model's "
                               f"vocabulary of {vocab}; the tokenizer does not belong to this model")
    kept = set().union(*groups.values())
    padding = 0
    if multiple and len(kept) % multiple:
        # pad with the lowest unused ids (deterministic) up to the runtime's preferred multiple, at most V
        free = (i for i in range(vocab) if i not in kept)
        for _ in range(min(multiple - len(kept) % multiple, vocab - len(kept))):
            kept.add(next(free))
            padding += 1
    counts = {g: len(v) for g, v in groups.items()}
    counts["padding"] = padding
    info = {"kept_from": counts, "special_ids": sorted(groups["special"]), "eos_ids": sorted(groups["eos"])}
    return np.array(sorted(kept), dtype=np.int32), info


class ReducedVocab(Feature):
    name = "reduced_vocab"

    def __init__(self, corpus=(), keep_tokens=None, multiple: int | None = None):
        self.corpus, self.keep_tokens, self.multiple = list(corpus or []), keep_tokens, multiple
        self.vocab_map: np.ndarray | None = None

    def check(self, run, target) -> None:
        if target.name not in TARGETS:
            raise UnsupportedModel(f"--reduce-vocab: target {target.name} has no reduced vocabulary")

        tok_dir = tokenizer_dir(run)
        tok = load_tokenizer(tok_dir, run.options.trust_remote_code)
        if tok is None:
            raise RewriteError(f"--reduce-vocab needs the model's tokenizer; none found in '{tok_dir}' "
                               f"(pass --tokenizer DIR)")
        vocab = int(run.spec["vocab_size"])
        folders = [tok_dir, Path(run.options.config).parent if run.options.config else run.in_path.parent]
        self.vocab_map, self.info = select(tok, vocab, self.corpus, self.keep_tokens, folders, self.multiple)
        self.vocab = vocab

    def apply(self, run, build) -> None:
        g = build.graph
        head, _ = lm_head_input(build.logits)
        vmap, vocab = self.vocab_map, self.vocab
        r = len(vmap)
        np_float = onnx.helper.tensor_dtype_to_np_dtype(build.float_type)
        base_dir = run.source.base_dir
        before = after = 0
        # lm_head's weight, then any per-token constant after it (a bias): cut along the vocabulary axis
        node, t = head, None
        while node is not None:
            for i, inp in enumerate(node.inputs):
                c, perm = self._constant_through_transpose(inp)
                if c is None or not c.shape or int(np.prod(c.shape)) <= 1:
                    continue
                shape = [int(c.shape[p]) for p in perm] if perm else list(c.shape)  # as `node` reads it
                axis = self._vocab_axis(node, i, shape, vocab)
                if axis is None:
                    continue
                before += int(np.prod(shape)) * np.dtype(np_float).itemsize
                shape[axis] = r
                after += int(np.prod(shape)) * np.dtype(np_float).itemsize
                src_axis = perm[axis] if perm else axis

                def cut(c=c, src_axis=src_axis, perm=perm):
                    rows = np.take(constant_array(c, base_dir), vmap, axis=src_axis)
                    return (rows.transpose(perm) if perm else rows).astype(np_float)

                node.inputs[i] = computed_constant(f"{node.name}/reduced_vocab_{i}", np_float, shape, cut)
            t = node.outputs[0]
            if t.shape is not None and len(t.shape) and t.shape[-1] == vocab:
                t.shape = list(t.shape[:-1]) + [r]
            node = t.outputs[0] if len(t.outputs) == 1 and t not in g.outputs else None
        if before == 0:
            raise UnsupportedModel(f"--reduce-vocab: lm_head '{head.name}' has no constant [H, {vocab}] weight to cut")
        for out in g.outputs:
            if out.name == "logits" and out.shape is not None:
                out.shape = list(out.shape[:-1]) + [r]
        run.report.features[self.name] = {
            "vocab_size": vocab, "reduced_vocab_size": r, **self.info,
            "lm_head_bytes": before, "lm_head_bytes_reduced": after, "lm_head_bytes_saved": before - after}
        import logging

        logging.getLogger(__name__).info(
            "reduced vocabulary: %d of %d tokens kept; lm_head %d -> %d bytes (%.1f%% saved)",
            r, vocab, before, after, 100.0 * (before - after) / before)

    @staticmethod
    def _constant_through_transpose(t) -> tuple[gs.Constant | None, list | None]:
        """(the constant, None) for a constant input; (its source, perm) for Transpose(constant): a tied lm_head
        of a large model reads Transpose(weight) (the embedding shares the weight, and a weight that large is
        not folded), which the cut reads through; else (None, None)."""
        if isinstance(t, gs.Constant):
            return t, None
        node = t.inputs[0] if len(t.inputs) == 1 else None
        if node is not None and node.op == "Transpose" and isinstance(node.inputs[0], gs.Constant) \
                and node.inputs[0].shape:
            rank = len(node.inputs[0].shape)
            return node.inputs[0], [int(p) for p in node.attrs.get("perm", range(rank - 1, -1, -1))]
        return None, None

    @staticmethod
    def _vocab_axis(node, i: int, shape, vocab: int) -> int | None:
        shape = [int(d) for d in shape]
        if node.op == "Gemm" and i == 1:
            axis = 0 if node.attrs.get("transB", 0) else 1
            return axis if shape[axis] == vocab else None
        if shape[-1] == vocab:  # MatMul's [H, V] weight; an Add's [V] bias
            return len(shape) - 1
        return None

    def config(self, run, cfg: dict) -> None:
        cfg["reduced_vocab_size"] = int(len(self.vocab_map))

    def files(self, run, out_dir) -> list[str]:
        from safetensors.numpy import save_file

        save_file({"vocab_map": np.ascontiguousarray(self.vocab_map, dtype=np.int32)}, str(Path(out_dir) / MAP_FILE))
        return [MAP_FILE]


