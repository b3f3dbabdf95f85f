"""The pattern author's API (`api`), the engine that runs patterns (`engine`) and the typed match
results (`results`). Patterns import `onnx_rewriter.matching` only: it re-exports `api`."""

from onnx_rewriter.matching.api import *  # noqa: F403
from onnx_rewriter.matching.api import __all__  # noqa: F401
