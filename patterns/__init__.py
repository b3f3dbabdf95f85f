"""The pattern library: one pattern per module, each exporting `PATTERN`.

Stages run in the order below; a pattern names its stage. Adding a module here (with `PATTERN`) is all
it takes for the engine to use it.
"""

from __future__ import annotations

import importlib
import pkgutil

STAGES = [
    "embedding",  # Gather(W, input_ids) that becomes the inputs_embeds input
    "rms_norm",  # RMSNorm cores: kept in fp32 by the dtype pass
    "qk_norm",  # RMSNorm core times a 1-D gamma (q/k norm candidates for the 0.11 plugin)
    "rope_table",  # cos/sin computed from positions and inv_freq
    "rope",  # rotate_half applied to q or k
    "rope_partial",  # rope over the first R dims, the rest passed through
    "kv_cache",  # Concat(past_key_values input, new k/v) -> present output, in exports with a cache
    "repeat_kv",  # GQA head expansion
    "k_transpose",  # k^T as one 4-D Transpose or a 3-D Reshape/Transpose/Reshape sandwich
    "attention_core",  # softmax(q k^T * s + mask) v
    "attention_layer",  # the whole layer: projections' outputs in, attention output out
]


def load_patterns() -> list:
    pats = []
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{mod.name}")
        pat = getattr(module, "PATTERN", None)
        if pat is not None:
            assert pat.stage in STAGES, f"{mod.name}: unknown stage {pat.stage}"
            pats.append(pat)
    return pats
