"""Options owned by their features: features.OPTIONS builds the CLI flags, pipeline.Options, validation and
the feature list; the target name is resolved to its Target once, in make_options."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from onnx_rewriter import cli, features, targets
from onnx_rewriter.errors import RewriteError, UnsupportedModel
from onnx_rewriter.features.base import FeatureOptions, option
from onnx_rewriter.pipeline import steps as pipeline


def _feature_fields():
    return [f for cls in features.OPTIONS for f in dataclasses.fields(cls)]


def test_options_are_core_plus_every_feature_field_flat():
    fields = {f.name: f for f in dataclasses.fields(pipeline.Options)}
    for f in _feature_fields():
        assert f.name in fields and fields[f.name].default == f.default, f.name
    core = {f.name for f in dataclasses.fields(pipeline.CoreOptions)}
    assert set(fields) == core | {f.name for f in _feature_fields()}
    assert pipeline.Options().kv_cache == "fp16" and pipeline.Options(quantize="int4").quantize == "int4"


def test_every_feature_flag_is_on_the_rewrite_and_export_command_lines_with_its_choices():
    for cmd in ("rewrite", "export"):
        actions = {a.dest: a for a in cli.build_parser(cmd)._actions}
        for f in _feature_fields():
            flag = f.metadata.get("flag")
            if flag is None:
                assert f.name not in actions  # API only (int4_checkpoint)
                continue
            a = actions[f.name]
            assert flag in a.option_strings and a.help
            assert a.choices == f.metadata["argparse"].get("choices")
    text = cli.build_parser("rewrite").format_help()
    for needle in ("--quantize {int4,fp8,nvfp4,int8-sq}", "--int4-plugin-version {1,2}", "--int4-method {rtn,awq}",
                   "--kv-cache {fp16,fp8}", "--reduce-vocab", "--vocab-corpus", "--lora", "--kv-scales"):
        assert needle in text


def test_parsed_command_line_reaches_options_by_field_name(tmp_path):
    args = cli.build_parser("rewrite").parse_args(["in.onnx", "out", "--quantize", "int4", "--int4-method", "awq",
                                                   "--kv-cache", "fp8", "--lora", "--int4-plugin-version", "1"])
    kw = cli._rewrite_kwargs(args)
    assert kw["quantize"] == "int4" and kw["int4_method"] == "awq" and kw["kv_cache"] == "fp8" and kw["lora"]
    assert kw["int4_plugin_version"] == 1 and "int4_checkpoint" not in kw
    opts = pipeline.Options(**kw)
    assert [type(f).__name__ for f in features.selected(opts)] == ["Int4", "Lora", "Fp8KV"]


def test_subcommands_and_the_implicit_rewrite():
    top = cli.build_parser()
    sub = next(a for a in top._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(cli.COMMANDS)
    args = top.parse_args(["export", "--model", "m", "--output_dir", "o", "--trust_remote_code"])
    assert args.command == "export" and args.output_dir == "o" and args.trust_remote_code


def test_target_is_resolved_once_to_its_object():
    opts = pipeline.make_options(target="edgellm-0.11")
    assert opts.target is targets.get("edgellm-0.11") and str(opts.target) == "edgellm-0.11"
    assert pipeline.make_options(opts).target is opts.target  # already resolved: kept
    with pytest.raises(RewriteError, match="unknown target 'edgellm-9'; choose one of: edgellm-0.10, edgellm-0.11"):
        pipeline.make_options(target="edgellm-9")


@pytest.mark.parametrize("kw, error, message", [
    (dict(kv_cache="fp4"), RewriteError, "unknown --kv-cache 'fp4'; choose fp16 or fp8"),
    (dict(int4_method="gptq"), RewriteError, "unknown --int4-method 'gptq'; choose rtn or awq"),
    (dict(int4_method="awq"), RewriteError, "--int4-method awq needs --quantize int4"),
    (dict(quantize="int8"), UnsupportedModel, "unknown --quantize 'int8'; choose int4"),
    (dict(quantize="int4", int4_plugin_version=3), RewriteError, "unknown --int4-plugin-version '3'; choose 1 or 2"),
    (dict(quantize="int4", int4_plugin_version=2, target="edgellm-0.9"), UnsupportedModel,
     "--int4-plugin-version 2: edgellm-0.9 has only Int4GroupwiseGemmPlugin"),
    (dict(quantize="int4", dtype="float32"), UnsupportedModel, "--quantize int4 needs --dtype float16"),
    (dict(kv_cache="fp8", dtype="float32"), UnsupportedModel, "--kv-cache fp8 needs --dtype float16"),
    (dict(vocab_multiple=8), RewriteError, "--vocab-multiple needs --reduce-vocab"),
    (dict(reduce_vocab=True), RewriteError, "--reduce-vocab needs the tokens to keep"),
])
def test_each_feature_validates_its_options_before_any_work(kw, error, message):
    with pytest.raises(error) as exc:
        pipeline.make_options(**kw)
    assert str(exc.value).startswith(message)


def test_lora_implies_separate_projections():
    assert pipeline.make_options(lora=True).fuse_qkv is False
    assert pipeline.make_options().fuse_qkv is True


def test_a_registered_feature_is_one_dataclass(monkeypatch):
    """What one more line in features.OPTIONS gives: a flat option, its flag and its validation."""

    @dataclass
    class ToyOptions(FeatureOptions):
        toy: str = option("off", "--toy", "a toy feature", choices=["off", "on"])

        def enabled(self):
            return self.toy == "on"

        def validate(self, target, options):
            if self.toy == "on" and target.name == "edgellm-0.5":
                raise UnsupportedModel(f"--toy: target {target.name} has no toy")

    monkeypatch.setattr(pipeline, "FEATURE_OPTIONS", [*features.OPTIONS, ToyOptions])
    Options = pipeline._options_class()
    assert Options(toy="on").toy == "on" and Options().toy == "off"
    parser = cli._Parser(prog="x")
    ToyOptions.add_arguments(parser)
    assert parser.parse_args(["--toy", "on"]).toy == "on"
    with pytest.raises(UnsupportedModel, match="--toy: target edgellm-0.5 has no toy"):
        ToyOptions.of(Options(toy="on")).validate(targets.get("edgellm-0.5"), None)

    @dataclass
    class Clash(FeatureOptions):
        lora: bool = option(False, "--lora2", "clashes with LoRA's field")

    monkeypatch.setattr(pipeline, "FEATURE_OPTIONS", [*features.OPTIONS, Clash])
    with pytest.raises(TypeError, match="option 'lora' of Clash is already one of LoraOptions"):
        pipeline._options_class()
