"""Tokenizer side files: tokenizer.json, tokenizer_config.json, special_tokens_map.json."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from onnx_rewriter.errors import RewriteError

# Any of these in a folder means a tokenizer is meant to be there.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# The named special tokens transformers knows, in the order transformers 4 wrote them.
_NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def load_tokenizer(path, trust_remote_code: bool = False):
    """The tokenizer saved in folder `path`, or None when the folder has none. Code of its own (an auto_map to a
    tokenization_*.py) runs only with `trust_remote_code` (--trust-remote-code), and is never asked about."""
    folder = Path(path)
    _check_files(folder)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    from .. import safety

    try:
        return AutoTokenizer.from_pretrained(folder, **safety.remote_code(trust_remote_code))
    except Exception as exc:  # a broken tokenizer is the user's to fix; say where and why in one line
        refusal = safety.remote_code_error(exc, folder)
        if refusal is not None:
            raise refusal from None
        if any(c.__name__ == "StrictDataclassError" for c in type(exc).__mro__) and (folder / "config.json").is_file():
            why = " ".join(str(exc).split())  # transformers reads config.json with the tokenizer: blame the right file
            raise RewriteError(f"'{folder / 'config.json'}' is not a valid model config ({why}); "
                               f"fix config.json") from None
        why = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise RewriteError(f"cannot load the tokenizer in {folder}: {why}; fix or replace its tokenizer files, pass "
                           f"another folder (--tokenizer DIR) or skip them (--no-tokenizer)") from exc


# Every file a tokenizer may be read from (transformers skips a missing one silently).
_READ_FILES = _TOKENIZER_FILES + ("special_tokens_map.json", "added_tokens.json", "merges.txt", "chat_template.jinja",
                                  "chat_template.json", "config.json")


def _check_files(folder: Path) -> None:
    """A dangling link or a non-regular file (FIFO, device) among the tokenizer's files is an error, not 'absent'
    (transformers would skip it and the output would silently lack, e.g., the chat template)."""
    for name in _READ_FILES:
        p = folder / name
        if p.is_symlink() and not p.exists():
            raise RewriteError(f"'{p}' is a link to '{os.readlink(p)}', which does not exist; restore the file, "
                               f"remove the link, or pass --no-tokenizer")
        if p.exists() and not p.is_file():
            raise RewriteError(f"'{p}' is not a regular file (a FIFO, device or folder); replace it with the "
                               f"model's file or pass --no-tokenizer")


def special_tokens_map(tokenizer) -> dict:
    """special_tokens_map.json as transformers 4 wrote it: named tokens plus additional_special_tokens."""
    named = {k: str(v) for k, v in tokenizer.special_tokens_map.items() if k in _NAMED and v is not None}
    # transformers 5 calls them extra_special_tokens; older tokenizers still expose additional_*.
    extra = (getattr(tokenizer, "extra_special_tokens", None)
             or getattr(tokenizer, "additional_special_tokens", None))
    if isinstance(extra, dict):  # multimodal tokenizers map names to tokens
        extra = list(extra.values())
    if extra:
        named["additional_special_tokens"] = [str(t) for t in extra]
    return named


def write_tokenizer_files(tokenizer, out_dir) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into out_dir.

    The chat template stays inline in tokenizer_config.json (save_jinja_files=False), the layout
    every runtime reads; a separate chat_template.jinja is written only by write_chat_template_jinja.
    Returns the file names written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    # save_pretrained may add files we don't ship (chat_template.jinja, vocab.json, ...): save aside, copy ours.
    from .. import safety

    with safety.temp_folder("tokenizer") as tmp:
        tokenizer.save_pretrained(tmp, save_jinja_files=False)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (Path(tmp) / name).is_file():
                shutil.copyfile(Path(tmp) / name, out / name)
                written.append(name)
    if "tokenizer.json" not in written:
        raise RewriteError("the tokenizer has no fast (tokenizer.json) form; the runtime needs one")
    text = json.dumps(special_tokens_map(tokenizer), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    (out / "special_tokens_map.json").write_text(text, encoding="utf-8")
    written.append("special_tokens_map.json")
    return written


def tokenizer_rows(tokenizer_json: Path) -> int:
    """Highest token id of a tokenizer.json + 1: the embedding rows its ids index. Raises ValueError."""
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    vocab = (data.get("model") or {}).get("vocab") or {}
    ids = list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1]  # Unigram: a list of pairs
    ids += [t["id"] for t in data.get("added_tokens") or [] if isinstance(t, dict) and "id" in t]
    if not all(isinstance(i, int) for i in ids):
        raise ValueError("token ids are not integers")
    return max(ids, default=-1) + 1
