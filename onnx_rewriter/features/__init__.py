"""Deployment features: optional changes to a rewritten graph (INT4 weights, FP8 KV cache, reduced vocabulary,
LoRA; VLM, implied by the input).

A feature is one module with one `Feature` object and, when the user selects it, one `FeatureOptions`
dataclass listed in `OPTIONS` below: its fields are options of `pipeline.Options` under the same (flat)
names, its `add_arguments` their command-line flags, its `validate` their checks and its `feature()` the
`Feature` it selects. Adding a feature = its module, its tests and one line in `OPTIONS`.

A feature declares, per target, what it emits and refuses targets that cannot express it; the pipeline
only runs the selected features' hooks in order:

- `prepare(run)`        at the end of step_load: turn input-specific ops into what the patterns match;
- `check(run, target)`  in step_check, before anything is built: refuse (UnsupportedModel) or warn;
- `kept_inputs(run)`    in step_build: the export's own graph inputs the feature keeps (targets drop the rest);
- `apply(run, build)`   in step_build, right after the target built its plugin graph;
- `config(run, cfg)`    when config.json is made: the keys the feature adds or changes;
- `schemas()`           OpSchemas of the ops it emits (registered before the file is checked);
- `files(run, out_dir)` side files it writes beside model.onnx (returns their names).

Features read the target-agnostic matches (run.layers, run.ctx) and the graph; they never reach into a
target's code. `selected(options)` turns the options into the feature list (docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..errors import RewriteError, UnsupportedModel


def fp16_plan(plans: dict, target, dtype: str, flag: str, lacks: str, fp16_why: str):
    """A feature's plan for `target` on an fp16 output; refused (UnsupportedModel) when the target has no
    row in `plans` ("{flag}: target T {lacks}") or the output dtype is not float16."""
    plan = plans.get(target.name)
    if plan is None:
        raise UnsupportedModel(f"{flag}: target {target.name} {lacks}")
    if dtype != "float16":
        raise UnsupportedModel(f"{flag} needs --dtype float16: {fp16_why}")
    return plan


def option(default=None, flag: str | None = None, help: str = "", **argparse_kw):
    """A field of a FeatureOptions dataclass: its default, its command-line `flag` (None: Python API only),
    the help text and argparse's other keywords (choices, type, nargs, metavar, action)."""
    return dataclasses.field(default=default, metadata={"flag": flag, "help": help, "argparse": argparse_kw})


def add_option_arguments(parser, cls) -> None:
    """The flags of every `option()` field of dataclass `cls`, dest = the field name."""
    for f in dataclasses.fields(cls):
        flag = f.metadata.get("flag")
        if flag is not None:
            kw = dict(f.metadata["argparse"])
            if kw.get("action") not in ("store_true", "count"):
                kw.setdefault("default", f.default)
            parser.add_argument(*([flag] if isinstance(flag, str) else flag), dest=f.name,
                                help=f.metadata["help"], **kw)


def check_choice(value, flag: str, choices, error=RewriteError) -> None:
    """The Python API's counterpart of argparse's `choices` ("unknown --flag 'x'; choose a or b")."""
    if value not in choices:
        raise error(f"unknown {flag} '{value}'; choose {' or '.join(map(str, choices))}")


def check_file(value, flag: str, what: str) -> None:
    if value is not None and not Path(value).is_file():
        raise RewriteError(f"{flag} '{value}' is not a file; {what}")


@dataclass
class FeatureOptions:
    """One feature's options. Subclasses are dataclasses whose fields are made with `option()`."""

    @classmethod
    def add_arguments(cls, parser) -> None:
        add_option_arguments(parser, cls)

    @classmethod
    def of(cls, options):
        """This feature's view of the flat `pipeline.Options`."""
        return cls(**{f.name: getattr(options, f.name) for f in dataclasses.fields(cls)})

    def enabled(self) -> bool:
        """Whether the options select the feature."""
        return False

    def validate(self, target, options) -> None:
        """Refuse wrong values or combinations (RewriteError), before any work. `target` is the resolved
        Target; `options` the whole Options (dtype, calibration, ...)."""

    def imply(self, options) -> None:
        """Set the core options the selected feature needs (LoRA: q/k/v stay separate MatMuls)."""

    def feature(self, options) -> Feature:
        raise NotImplementedError


class Feature:
    name = "feature"

    def prepare(self, run) -> None:
        pass

    def check(self, run, target) -> None:
        pass

    def kept_inputs(self, run) -> list:
        return []

    def apply(self, run, build) -> None:
        pass

    def config(self, run, cfg: dict) -> None:
        pass

    def schemas(self) -> list:
        return []

    def files(self, run, out_dir) -> list[str]:
        return []


def selected(options) -> list[Feature]:
    """The features the options ask for, in the order their hooks run (the order of OPTIONS)."""
    return [o.feature(options) for o in (cls.of(options) for cls in OPTIONS) if o.enabled()]


def implied(run) -> list[Feature]:
    """Features the input itself needs, unless already selected: MatMulNBits / blocked DequantizeLinear
    weights need INT4; a [3, B, S] position_ids input (M-RoPE) is a VLM text decoder."""
    from .vlm import Vlm, is_mrope_graph

    out: list[Feature] = []
    if is_mrope_graph(run.source.graph):
        out.append(Vlm())
    if any(f.name == "int4" for f in run.features):
        return out
    if any(n.op == "MatMulNBits" or (n.op == "DequantizeLinear" and n.attrs.get("block_size"))
           for n in run.source.graph.nodes):
        from .int4 import Int4

        out.append(Int4())
    return out


# The registry: every user-selected feature's options, in the order its hooks run. LoRA comes after INT4:
# it attaches to the INT4 plugins too.
from . import fp8_kv, int4, lora, reduced_vocab  # noqa: E402 (they import Feature from here)

OPTIONS: list[type[FeatureOptions]] = [
    int4.Int4Options,
    reduced_vocab.ReducedVocabOptions,
    lora.LoraOptions,
    fp8_kv.Fp8KvOptions,
]
