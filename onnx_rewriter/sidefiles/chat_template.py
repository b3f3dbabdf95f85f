"""processed_chat_template.json (0.5 / 0.9) and chat_template.jinja (0.11).

The 0.5/0.9 runtimes have no Jinja: they format a chat as  default/system block, then per message
role prefix + content + role suffix, then the generation prompt. We recover those strings by
rendering the HF template with placeholder messages and diffing the renders:
  block(m) = render(msgs + [m]) - render(msgs), split around m's placeholder.
Assistant strings come from an assistant turn followed by a user turn (the history form), because
templates such as Qwen3 decorate only the final assistant message. The runtime uses
generation_prompt when thinking is off, so it is rendered with enable_thinking=False, and
generation_prompt_thinking (enable_thinking=True) is kept only when it differs: for Qwen3 that gives
"...assistant\n<think>\n\n</think>\n\n" and "...assistant\n".

Tokenizers without a chat template (base models) get the neutral template: every prefix, suffix,
prompt and the default system prompt empty, i.e. messages are concatenated as raw text, which is
what a base model expects. A warning says so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from onnx_rewriter.errors import RewriteError

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
_PH = {r: f"<<{r.upper()}_PLACEHOLDER>>" for r in ROLES}
_PH2 = "<<USER2_PLACEHOLDER>>"

# Jinja equivalent of the neutral template, for chat_template.jinja.
NEUTRAL_JINJA = "{%- for message in messages %}{{- message['content'] }}{%- endfor %}"


class _Unsupported(Exception):
    """The template does not render this conversation in the prefix/content/suffix shape."""


def _neutral() -> dict:
    return {
        "roles": {r: {"prefix": "", "suffix": ""} for r in ROLES},
        "generation_prompt": "",
        "default_system_prompt": "",
    }


def _renderer(tokenizer):
    """render(msgs, **kw) -> text without a leading BOS, and the BOS text to put back (or "").

    A leading BOS appears once per conversation, so it would spoil every diff. The BOS is put back in
    front of the system prefix (where NVIDIA's exporter has it) unless the tokenizer prepends BOS
    itself when encoding: keeping the template's copy then would give two.
    """
    bos = tokenizer.bos_token or ""

    def render(msgs, **kw) -> str:
        conv = [{"role": r, "content": c} for r, c in msgs]
        text = tokenizer.apply_chat_template(conv, tokenize=False, **kw)
        return text[len(bos):] if bos and text.startswith(bos) else text

    raw = tokenizer.apply_chat_template([{"role": "user", "content": _PH["user"]}], tokenize=False)
    lead = bos if bos and raw.startswith(bos) and not _adds_bos(tokenizer) else ""
    return render, lead


def _adds_bos(tokenizer) -> bool:
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:
        return False
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def _after(longer: str, shorter: str) -> str:
    if not longer.startswith(shorter):
        raise _Unsupported("a later render does not extend the earlier one")
    return longer[len(shorter):]


def _split(block: str, placeholder: str) -> dict:
    if block.count(placeholder) != 1:
        raise _Unsupported(f"placeholder appears {block.count(placeholder)} times")
    prefix, suffix = block.split(placeholder)
    return {"prefix": prefix, "suffix": suffix}


def _block(role: dict, content: str) -> str:
    return role["prefix"] + content + role["suffix"]


def _user_assistant(render, head: list) -> tuple[dict, dict]:
    """User and assistant strings from conversations that start with `head` (maybe a system message)."""
    u, a = _PH["user"], _PH["assistant"]
    h = render(head) if head else ""
    user = _split(_after(render(head + [("user", u)]), h), u)
    # History form of the assistant: [.., user, assistant, user2] minus [.., user] minus the user2 block.
    rest = _after(render(head + [("user", u), ("assistant", a), ("user", _PH2)]), render(head + [("user", u)]))
    tail = _block(user, _PH2)
    if not rest.endswith(tail):
        raise _Unsupported("the second user turn is rendered differently from the first")
    assistant = _split(rest[: len(rest) - len(tail)], a)
    return user, assistant


def processed_chat_template(tokenizer) -> dict:
    """The contract's processed chat template for `tokenizer` (see module doc)."""
    if not getattr(tokenizer, "chat_template", None):
        log.warning("the tokenizer has no chat template; writing a neutral one (no role prefixes or suffixes)")
        return _neutral()
    try:
        render, lead = _renderer(tokenizer)
    except Exception as exc:
        raise _error(exc) from exc
    s, u = _PH["system"], _PH["user"]

    try:
        system = _split(render([("system", s)]), s)
        user, assistant = _user_assistant(render, [("system", s)])
        base = [("system", s), ("user", u)]
    except Exception as exc:  # TemplateError (e.g. "System role not supported") or an odd shape
        # Gemma-style templates fold the system text into the first user turn: not expressible as a
        # prefix/suffix pair, so the system message is sent as a user turn of its own.
        log.warning("the chat template has no separate system turn (%s); system messages are formatted as "
                    "user turns", exc)
        try:
            user, assistant = _user_assistant(render, [])
        except Exception as exc2:
            raise _error(exc2) from exc2
        system, base = dict(user), [("user", u)]

    default_system = _default_system(render, system, user)
    system = {"prefix": lead + system["prefix"], "suffix": system["suffix"]}
    out = {"roles": {"system": system, "user": user, "assistant": assistant}}
    out["generation_prompt"] = _generation_prompt(render, base, enable_thinking=False)
    thinking = _generation_prompt(render, base, enable_thinking=True)
    if thinking != out["generation_prompt"]:
        out["generation_prompt_thinking"] = thinking
    out["default_system_prompt"] = default_system
    return out


def _generation_prompt(render, msgs, **kw) -> str:
    try:
        return _after(render(msgs, add_generation_prompt=True, **kw), render(msgs, **kw))
    except Exception as exc:
        raise _error(exc) from exc


def _default_system(render, system: dict, user: dict) -> str:
    """What the template injects when the chat has no system message."""
    text, tail = render([("user", _PH["user"])]), _block(user, _PH["user"])
    injected = text[: len(text) - len(tail)] if text.endswith(tail) else None
    if not injected:
        return "" if injected == "" else _fail_default()
    pre, suf = system["prefix"], system["suffix"]
    if injected.startswith(pre) and injected.endswith(suf) and len(injected) >= len(pre) + len(suf):
        return injected[len(pre): len(injected) - len(suf)]
    return _fail_default()


def _fail_default() -> str:
    log.warning("the chat template injects text without a system message that is not a system turn; "
          "default_system_prompt left empty")
    return ""


def _error(exc: Exception):
    return RewriteError(
        f"cannot reduce the chat template to role prefixes/suffixes ({exc}); fix the tokenizer's chat template "
        "(tokenizer_config.json or chat_template.jinja), pass another tokenizer (--tokenizer DIR), or pass "
        "--no-tokenizer and add the tokenizer files and processed_chat_template.json by hand"
    )


def _dump(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_processed_chat_template(tokenizer, out_dir) -> Path:
    path = Path(out_dir) / "processed_chat_template.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_dump(processed_chat_template(tokenizer)), encoding="utf-8")
    return path


def write_chat_template_jinja(tokenizer, out_dir) -> Path:
    """The model's Jinja template verbatim (0.11 renders it itself); the neutral one when there is none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the runtime takes the default one
        template = template.get("default")
    if not template:
        log.warning("the tokenizer has no chat template; writing a neutral chat_template.jinja "
                    "(message contents concatenated)")
        template = NEUTRAL_JINJA
    path = Path(out_dir) / "chat_template.jinja"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(template, encoding="utf-8")
    return path
