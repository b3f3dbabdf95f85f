"""What every deployment feature builds on: the `Feature` hooks (see features/__init__.py), the
`FeatureOptions` dataclass a user-selected feature declares its options in, and small shared checks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from onnx_rewriter.errors import RewriteError, UnsupportedModel


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
    writes_embedding = True  # the folder gets embedding.safetensors (an EAGLE3 draft's does not)
    writes_tokenizer = True  # the folder gets the tokenizer files (an EAGLE3 draft's does not)

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


def weight_matmuls(graph):
    """(node, weight, K, N) of each MatMul of `graph` (a gs.Graph) that multiplies an activation by a constant
    [K, N] weight: the linears a weight-quantization feature may replace."""
    import onnx_graphsurgeon as gs

    for node in [n for n in graph.nodes if n.op == "MatMul"]:
        w = node.inputs[1]
        if not isinstance(w, gs.Constant) or len(w.shape) != 2 or isinstance(node.inputs[0], gs.Constant):
            continue
        k, n = (int(d) for d in w.shape)
        yield node, w, k, n
