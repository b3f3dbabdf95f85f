"""Reading a config.json (a checkpoint's, a rewritten folder's, an adapter's): one way, one error line."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import RewriteError


def read_config(path, fix: str = "fix or replace it") -> dict:
    """The JSON object in `path`. A file that cannot be read, is not JSON or holds something else than an
    object raises a one-line RewriteError naming it and ending with `fix` (what the user should do)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RewriteError(f"'{path}' is not readable JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise RewriteError(f"'{path}' holds a JSON {type(data).__name__}, not an object; {fix}")
    return data
