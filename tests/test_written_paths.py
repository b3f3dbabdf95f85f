"""Every path the tool writes, on every route, pointed at what it reads: refused before any work.

For each route (ROUTES: rewrite, export of a text checkpoint, export of a VLM) and each option that names
a file or folder it writes (the output folder, --report, --keep-baseline), the option is pointed at the
input model, the input's folder (the checkpoint), its config.json, the output folder and a file inside
an earlier output, always with --force. Each must end in one `error:` line (exit 2) naming the option,
before anything is loaded, with the inputs and the earlier output byte for byte unchanged and no
temporary folder left. A new route or a new written option must be added here:
`test_every_written_option_is_fuzzed` fails until it is.
"""

from __future__ import annotations

import importlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from onnx_rewriter import cli, safety
from tests.support.paths import no_work, ours

from .test_errors import assert_refused
from .test_safety import tree

export_mod = importlib.import_module("onnx_rewriter.hf.export")
vlm_mod = importlib.import_module("onnx_rewriter.hf.vlm")


@dataclass
class Route:
    name: str
    command: list  # argv before the options: the command and its input
    output: str  # how the output folder is given: "" (positional) or an option
    options: tuple  # the options naming a written file or folder, besides the output


ROUTES = {
    "rewrite": Route("rewrite", ["{input}"], "", ("--report",)),
    "export": Route("export", ["export", "--model", "{input}"], "--output-dir", ("--report", "--keep-baseline")),
    "export-vlm": Route("export-vlm", ["export", "--model", "{input}"], "--output-dir",
                        ("--report", "--keep-baseline")),
}
# The commands and the options of theirs that write (the rest only read): every one must be in ROUTES.
WRITTEN_DESTS = {"output_dir": "output", "report": "--report", "keep_baseline": "--keep-baseline"}
READ_DESTS = {"input", "model", "out_dir", "config", "tokenizer", "vocab_corpus", "keep_tokens", "kv_scales",
              "calibration", "baseline", "lora_adapter", "fp16_model", "vocab_multiple",
              "eagle_draft"}  # export: the draft checkpoint (protected like the checkpoint); verify: read
TARGETS = ("input model", "input folder", "config", "output folder", "file in output")


@pytest.fixture(scope="module")
def sources(models):
    return {"rewrite": models.baseline("llama").parent, "export": models.checkpoint("llama"),
            "export-vlm": models.vlm_checkpoint("qwen2_5_vl")}


def _earlier_output(out: Path) -> None:
    """A folder this tool wrote before (its manifest): --force may replace it, nothing else may touch it."""
    out.mkdir()
    (out / "model.onnx").write_bytes(b"earlier output")
    safety.write_manifest(out)


def _cases():
    for route in ROUTES.values():
        for option in ("output",) + route.options:
            for target in TARGETS:
                if option == "output" and target == "output folder":
                    continue  # the route's own output: replacing an earlier output with --force is its job
                yield pytest.param(route.name, option, target, id=f"{route.name}-{option.lstrip('-')}-{target}")


@pytest.mark.parametrize("route,option,target", list(_cases()))
def test_written_path_pointed_at_what_is_read(sources, tmp_path, private_tmp, capsys, monkeypatch, route, option,
                                              target):
    r = ROUTES[route]
    src = tmp_path / "in"
    shutil.copytree(sources[route], src)
    model = src / ("model.onnx" if route == "rewrite" else "model.safetensors")
    assert model.is_file()
    out = tmp_path / "out"
    _earlier_output(out)
    paths = {"input model": model, "input folder": src, "config": src / "config.json", "output folder": out,
             "file in output": out / "model.onnx"}
    before = {"in": tree(src), "out": tree(out)}
    no_work(monkeypatch)

    given = {"output": out, option: paths[target]}
    argv = [a.format(input=model if route == "rewrite" else src) for a in r.command]
    argv += [str(given["output"])] if not r.output else [r.output, str(given["output"])]
    argv += [x for opt, p in given.items() if opt != "output" for x in (opt, str(p))]
    code = cli.main(argv + ["--force"])
    _, err = capsys.readouterr()

    assert_refused(code, err, "output" if option == "output" else option)
    assert tree(src) == before["in"] and tree(out) == before["out"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["TMPDIR", "in", "out"]  # no .tmp-/.old- siblings
    assert ours(private_tmp) == []


def test_every_written_option_is_fuzzed():
    """A new command or option that writes a path fails here until ROUTES covers it (and verify, inspect
    write nothing)."""
    fuzzed = {(r.command[0] if r.command[0] in cli.COMMANDS else "rewrite", o)
              for r in ROUTES.values() for o in ("output",) + r.options}
    for cmd in cli.COMMANDS:
        for action in cli.build_parser(cmd)._actions:
            if action.dest in WRITTEN_DESTS:
                assert (cmd, WRITTEN_DESTS[action.dest]) in fuzzed, (cmd, action.dest)
            elif action.metavar in ("FILE", "DIR", "N") or action.dest in ("input", "out_dir", "model"):
                assert action.dest in READ_DESTS, f"{cmd} {action.dest}: written or read? classify it here"


def test_vlm_route_is_taken(sources):
    """The VLM rows above really go the VLM way (export.py hands a VLM checkpoint to vlm.py)."""
    assert vlm_mod.vlm_type(str(sources["export-vlm"])) == "qwen2_5_vl"
    assert vlm_mod.vlm_type(str(sources["export"])) is None
    assert json.loads((sources["export-vlm"] / "config.json").read_text())["model_type"] == "qwen2_5_vl"
