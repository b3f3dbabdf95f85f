"""Runtime contracts, one module per target; `get(name)` picks one."""

from __future__ import annotations

from ..errors import RewriteError
from .base import Target
from .edgellm_010 import TARGET as _E010
from .edgellm_011 import TARGET as _E011
from .edgellm_05 import TARGET as _E05
from .edgellm_09 import TARGET as _E09

DEFAULT = "edgellm-0.9"
TARGETS: dict[str, Target] = {t.name: t for t in (_E05, _E09, _E010, _E011)}


def describe() -> str:
    """Each target with the runtime releases it serves, for --help."""
    return "; ".join(f"{t.name}: runtime {t.releases}" for t in TARGETS.values())


def get(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise RewriteError(f"unknown target '{name}'; choose one of: {', '.join(sorted(TARGETS))}") from None
