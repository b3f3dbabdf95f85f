"""The `Feature` base class: the hooks a deployment feature may implement (see features/__init__.py)."""

from __future__ import annotations

from ..errors import UnsupportedModel


class Feature:
    name = "feature"

    @staticmethod
    def fp16_plan(plans: dict, run, target, flag: str, lacks: str, fp16_why: str):
        """The feature's plan for `target` on an fp16 output; refused (UnsupportedModel) when the target has
        no row in `plans` ("{flag}: target T {lacks}") or the output dtype is not float16."""
        plan = plans.get(target.name)
        if plan is None:
            raise UnsupportedModel(f"{flag}: target {target.name} {lacks}")
        if run.options.dtype != "float16":
            raise UnsupportedModel(f"{flag} needs --dtype float16: {fp16_why}")
        return plan

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
