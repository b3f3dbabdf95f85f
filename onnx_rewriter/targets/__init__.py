"""Runtime contracts, one module per target; `get(name)` picks one."""

from __future__ import annotations

from ..errors import RewriteError
from .base import Target
from .edgellm_09 import TARGET as _E09

DEFAULT = "edgellm-0.9"
TARGETS: dict[str, Target] = {t.name: t for t in (_E09,)}


def get(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise RewriteError(f"unknown target '{name}'; choose one of: {', '.join(sorted(TARGETS))}") from None
