"""Misuse a new user tries: never destroy their files, never pass without checking, say what they can fix.

Every case asserts the exit code, the one `error:` line (naming the file or option and the fix), that the
input or checkpoint is byte for byte untouched, and that nothing is left behind. Set
ONNX_REWRITER_CASES=FILE to collect a table of (case, exit code, first line of the message).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

import onnx_rewriter
from onnx_rewriter import cli, safety
from onnx_rewriter.errors import RewriteError
from onnx_rewriter.pipeline import steps as pipeline

from .support.processes import default_sigint, signal_mid_write, start_mid_write
from .test_errors import assert_no_output, assert_refused

ROOT = Path(__file__).resolve().parents[1]
export_mod = importlib.import_module("onnx_rewriter.hf.export")  # the package re-exports a function of that name


def run_cli(capsys, case, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    record(case, code, err, out)
    return code, out, err


def record(case, code, err, out=""):
    """Append (case, exit code, first line of the message) to $ONNX_REWRITER_CASES, for the issue's table."""
    path = os.environ.get("ONNX_REWRITER_CASES")
    if path:
        lines = [l for l in err.splitlines() if l.startswith("error:")] or out.strip().splitlines()[-1:] or [""]
        with open(path, "a") as fh:
            fh.write(json.dumps([case, code, lines[0]]) + "\n")


def tree(folder: Path) -> dict:
    """Every file under `folder` (links followed) -> sha256: 'untouched' means equal trees."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# ------------------------------------------------------------------ data loss


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_export_output_overlapping_the_checkpoint(ckpt, capsys, monkeypatch, where):
    monkeypatch.setattr(export_mod, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    out = {"same": ckpt, "parent": ckpt.parent, "inside": ckpt / "out"}[where]
    before = tree(ckpt)
    code, _, err = run_cli(capsys, f"export --output-dir = {where} of the checkpoint, --force",
                           "export", "--model", ckpt, "--output-dir", out, "--force")
    how = {"same": "is", "parent": "contains", "inside": "lies inside"}[where]
    assert_refused(code, err, f"{how} the checkpoint", str(ckpt), "outside")
    assert "--force" not in err.splitlines()[-1]
    assert tree(ckpt) == before and leftovers(ckpt.parent) == [] and not (ckpt / "out").exists()


@pytest.mark.parametrize("where", ["same", "parent", "inside", "dot"])
def test_rewrite_output_overlapping_the_input(base, capsys, monkeypatch, where):
    folder = base.parent
    before = tree(folder.parent)
    if where == "dot":
        monkeypatch.chdir(folder.parent)
    out = {"same": folder, "parent": folder.parent, "inside": folder / "out", "dot": "."}[where]
    code, _, err = run_cli(capsys, f"rewrite OUT = {where} of the input's folder, --force", base, out, "--force")
    if where == "inside":  # `rewrite model.onnx out` beside the model: the common case, nothing is destroyed
        assert code == 0, err
        after = tree(folder.parent)
        assert {k: v for k, v in after.items() if not k.startswith("base/out/")} == before
    else:
        how = {"same": "is", "parent": "contains", "dot": "contains"}[where]
        assert_refused(code, err, f"{how} the input model's folder", "another output folder")
        assert tree(folder.parent) == before
    assert leftovers(folder.parent) == [] and leftovers(folder) == []


def test_force_never_replaces_a_folder_it_did_not_write(base, tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8 not ours")
    code, _, err = run_cli(capsys, "--force on a folder of the user's", base, out, "--force")
    assert_refused(code, err, "'holiday.jpg'", "did not write", "never replaced, even with --force")
    assert tree(out) == {"holiday.jpg": hashlib.sha256(b"\xff\xd8 not ours").hexdigest()}
    assert leftovers(tmp_path) == []


def test_force_keeps_a_file_the_user_added_to_an_output(base, tmp_path, capsys):
    out = tmp_path / "out"
    pipeline.rewrite(base, out)
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "--force on an output the user added a file to", base, out, "--force")
    assert_refused(code, err, "'notes.txt'", "did not write")
    assert (out / "notes.txt").read_text() == "mine"


def test_force_replaces_its_own_output(base, tmp_path, capsys):
    out = tmp_path / "out"
    pipeline.rewrite(base, out, dtype="float32")
    code, _, err = run_cli(capsys, "rewrite over its own earlier output, no --force", base, out)
    assert_refused(code, err, "earlier onnx_rewriter output", "pass --force")
    before = tree(base.parent)
    code, out_text, err = run_cli(capsys, "rewrite over its own earlier output, --force", base, out, "--force", "-q")
    assert code == 0, err
    assert json.loads((out / safety.MANIFEST).read_text())["files"] == sorted(
        p.name for p in out.iterdir() if p.name != safety.MANIFEST)
    assert tree(base.parent) == before and leftovers(tmp_path) == []


def test_symlinked_output_is_replaced_through_the_link(base, tmp_path, capsys):
    real = tmp_path / "real"
    pipeline.rewrite(base, real, dtype="float32")
    link = tmp_path / "link"
    link.symlink_to(real)
    old = (real / "model.onnx").read_bytes()
    code, _, err = run_cli(capsys, "symlinked earlier output, --force", base, link, "--force", "-q")
    assert code == 0, err
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert (real / "model.onnx").read_bytes() != old  # fp16 now
    assert leftovers(tmp_path) == []


def test_symlink_into_the_input_folder_is_refused(base, tmp_path, capsys):
    link = tmp_path / "innocent"
    link.symlink_to(base.parent)
    before = tree(base.parent)
    code, _, err = run_cli(capsys, "symlink to the input's folder, --force", base, link, "--force")
    assert_refused(code, err, "is the input model's folder")
    assert tree(base.parent) == before and link.is_symlink()


def test_dot_output_inside_an_earlier_output(base, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    pipeline.rewrite(base, out, dtype="float32")
    monkeypatch.chdir(out)
    code, _, err = run_cli(capsys, "OUT = . (an earlier output), --force", base, ".", "--force", "-q")
    assert code == 0, err
    assert Path.cwd() == out.resolve() and (out / "model.onnx").is_file()  # still in a live folder
    assert leftovers(tmp_path) == []


def test_config_and_tokenizer_are_not_overwritten(base, tmp_path, capsys):
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    shutil.copy(base.parent / "config.json", cfg_dir / "config.json")
    code, _, err = run_cli(capsys, "OUT = the --config's folder", base, cfg_dir, "--config", cfg_dir / "config.json")
    assert_refused(code, err, "contains the --config file")
    assert (cfg_dir / "config.json").read_bytes() == (base.parent / "config.json").read_bytes()


# ------------------------------------------------------------------ wrong results reported as success


@pytest.mark.parametrize("layers", [3, 1])
def test_config_layers_contradict_the_weights(ckpt, tmp_path, capsys, monkeypatch, layers):
    monkeypatch.setattr(export_mod, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    (ckpt / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, f"config.json says {layers} layers, weights 2", "export", "--model", ckpt,
                           "--output-dir", out)
    assert_refused(code, err, f"num_hidden_layers={layers}", "weights have 2", "config.json")
    assert_no_output(out)


@pytest.mark.parametrize("field, value, found", [("hidden_size", 96, "have 64"), ("vocab_size", 256, "have 320"),
                                                 ("num_attention_heads", 8, "heads of"),
                                                 ("num_key_value_heads", 4, "heads of"),
                                                 ("intermediate_size", 100, "have 128")])
def test_config_sizes_contradict_the_weights(ckpt, tmp_path, capsys, monkeypatch, field, value, found):
    monkeypatch.setattr(export_mod, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg[field] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, f"config.json {field}={value} vs weights", "export", "--model", ckpt,
                           "--output-dir", out)
    assert_refused(code, err, f"{field}={value}", found)
    assert_no_output(out)


@pytest.mark.parametrize("steps", ["-1", "0", "1000"])
def test_verify_steps_out_of_range(base, tmp_path, capsys, steps):
    out = tmp_path / "out"
    pipeline.rewrite(base, out, dtype="float32")
    code, _, err = run_cli(capsys, f"verify --steps {steps}", "verify", out, "--baseline", base, "--steps", steps)
    assert_refused(code, err, f"--steps {steps}", "from 1 to 500")


def test_export_with_a_broken_tokenizer_fails_before_the_export(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export_mod, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    (ckpt / "tokenizer.json").write_text('{"broken": ')
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "export, corrupt tokenizer.json", "export", "--model", ckpt, "--output-dir", out)
    assert_refused(code, err, "cannot load the tokenizer", str(ckpt), "--no-tokenizer")
    assert_no_output(out)
    code, _, err = run_cli(capsys, "export --tokenizer missing folder", "export", "--model", ckpt,
                           "--output-dir", out, "--tokenizer", tmp_path / "nope")
    assert_refused(code, err, "--tokenizer", "is not a folder")
    assert_no_output(out)


def test_rewrite_with_a_broken_tokenizer_same_as_export(base, tmp_path, capsys):
    (base.parent / "tokenizer.json").write_text('{"broken": ')
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "rewrite, corrupt tokenizer.json", base, out)
    assert_refused(code, err, "cannot load the tokenizer", "--no-tokenizer")
    assert_no_output(out)
    code, _, err = run_cli(capsys, "rewrite, corrupt tokenizer.json, --no-tokenizer", base, out, "--no-tokenizer")
    assert code == 0, err
    assert "WARNING: --no-tokenizer: not written: tokenizer.json" in err
    assert not (out / "tokenizer.json").exists()


@pytest.mark.parametrize("report", ["missing-dir/r.json", "a-folder"])
def test_unwritable_report_fails_before_any_work(base, tmp_path, capsys, monkeypatch, report):
    monkeypatch.setattr(pipeline, "STEPS", [lambda run: pytest.fail("did work")])
    (tmp_path / "a-folder").mkdir()
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, f"--report {report}", base, out, "--report", tmp_path / report)
    assert_refused(code, err, "--report", "path")
    assert_no_output(out)


# ------------------------------------------------------------------ fixable errors, not bugs


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()[:100]}")


@contextlib.contextmanager
def _tmpfs(folder: Path, options: str):
    _mount_tmpfs(folder, options)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def small_fs(tmp_path):
    with _tmpfs(tmp_path / "small", "size=128k") as mnt:
        yield mnt


@pytest.fixture
def read_only_fs(tmp_path):
    with _tmpfs(tmp_path / "ro", "size=1m,ro") as mnt:
        yield mnt


def test_full_disk(base, small_fs, capsys):
    out = small_fs / "out"
    before = tree(base.parent)
    code, _, err = run_cli(capsys, "output on a full (128 kB) filesystem", base, out)
    assert_refused(code, err, "no space left on device", str(out), "free some space")
    assert_no_output(out)
    assert list(small_fs.iterdir()) == [] and tree(base.parent) == before


def test_full_temp_folder_during_export(ckpt, small_fs, tmp_path, capsys, monkeypatch):
    import tempfile

    def big_baseline(model, path, *a, **k):  # what a real export writes there, only sooner
        path.write_bytes(bytes(1 << 20))

    monkeypatch.setattr(export_mod, "export_baseline", big_baseline)
    monkeypatch.setattr(tempfile, "tempdir", str(small_fs))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "export with TMPDIR on a full filesystem", "export", "--model", ckpt,
                           "--output-dir", out)
    assert_refused(code, err, "cannot write the baseline export", str(small_fs), "no space left", "TMPDIR")
    assert_no_output(out)
    assert list(small_fs.iterdir()) == []


def test_read_only_output(base, read_only_fs, capsys):
    out = read_only_fs / "out"
    code, _, err = run_cli(capsys, "output on a read-only filesystem", base, out)
    assert_refused(code, err, "cannot write", "read-only", "choose another output folder")
    assert_no_output(out)


def test_truncated_checkpoint(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export_mod, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "truncated model.safetensors", "export", "--model", ckpt, "--output-dir", out)
    assert_refused(code, err, str(f), "truncated", "download or save it again")
    assert_no_output(out)


def test_device_this_torch_lacks(ckpt, tmp_path, capsys, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    monkeypatch.setattr(export_mod, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--device cuda on a CPU torch", "export", "--model", ckpt, "--output-dir", out,
                           "--device", "cuda")
    assert_refused(code, err, "--device cuda", "--device cpu")
    code, _, err = run_cli(capsys, "--device tpu", "export", "--model", ckpt, "--output-dir", out, "--device", "tpu")
    assert_refused(code, err, "unknown --device 'tpu'")
    assert_no_output(out)


def test_verify_baseline_that_is_not_a_logits_model(base, tmp_path, capsys):
    out = tmp_path / "out"
    pipeline.rewrite(base, out, dtype="float32")
    code, _, err = run_cli(capsys, "verify --baseline = the rewritten model", "verify", out, "--baseline",
                           out / "model.onnx")
    assert_refused(code, err, "already an EdgeLLM graph", "plain export")
    model = onnx.load(str(base), load_external_data=False)
    model.graph.input[0].name = "pixels"
    for n in model.graph.node:
        n.input[:] = ["pixels" if i == "input_ids" else i for i in n.input]
    other = tmp_path / "other.onnx"
    onnx.save(model, str(other))
    code, _, err = run_cli(capsys, "verify --baseline without input_ids", "verify", out, "--baseline", other)
    assert_refused(code, err, "not a logits model", "input_ids")


def test_config_holding_a_json_list(base, tmp_path, capsys):
    (tmp_path / "list.json").write_text("[1, 2, 3]")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--config holding a JSON list", base, out, "--config", tmp_path / "list.json")
    assert_refused(code, err, "list.json", "JSON list", "HF config.json")
    assert_no_output(out)


def test_chat_template_that_raises(base, tmp_path, capsys):
    folder = base.parent
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    raising = "{{ raise_exception('System role not supported') }}"
    cfg["chat_template"] = raising
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    if (folder / "chat_template.jinja").exists():
        (folder / "chat_template.jinja").write_text(raising)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "chat template that raises", base, out)
    last = assert_refused(code, err, "chat template", "System role not supported", "--tokenizer DIR", "--no-tokenizer")
    assert "edit processed_chat_template.json" not in last
    assert_no_output(out)


@pytest.mark.parametrize("opset", [7, 12, 99])
def test_opset_out_of_range(base, tmp_path, capsys, opset):
    model = onnx.load(str(base), load_external_data=False)
    next(o for o in model.opset_import if o.domain in ("", "ai.onnx")).version = opset
    onnx.save(model, str(base))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, f"opset {opset} graph", base, out)
    last = assert_refused(code, err, f"opset {opset}", "opsets 14 to", "re-export")
    assert last.endswith(")")  # never cut mid-word
    assert_no_output(out)


def test_already_rewritten_input(base, tmp_path, capsys):
    first = tmp_path / "first"
    pipeline.rewrite(base, first, dtype="float32")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "rewrite an EdgeLLM graph again", first / "model.onnx", out)
    assert_refused(code, err, "already an EdgeLLM graph", "plain export")
    assert_no_output(out)


# ------------------------------------------------------------------ options checked before any work


def test_dtype_choices(base, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "STEPS", [lambda run: pytest.fail("did work")])
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--dtype bfloat16", base, out, "--dtype", "bfloat16")
    assert_refused(code, err, "--dtype", "'bfloat16'", "float16", "--help")
    assert_no_output(out)
    with pytest.raises(RewriteError, match="unknown --dtype 'bfloat16'"):
        onnx_rewriter.rewrite(base, out, dtype="bfloat16")


def test_api_keyword_typos_fail_before_any_work(base, ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    monkeypatch.setattr(pipeline, "STEPS", [lambda run: pytest.fail("did work")])
    t0 = time.perf_counter()
    with pytest.raises(RewriteError, match="unknown option 'verify'"):
        onnx_rewriter.export(str(ckpt), tmp_path / "out", verify=True)
    with pytest.raises(RewriteError, match="unknown option 'dtpye'"):
        onnx_rewriter.rewrite(base, tmp_path / "out", dtpye="float32")
    with pytest.raises(RewriteError, match="--steps 0"):
        onnx_rewriter.verify(tmp_path, baseline=str(base), steps=0)
    assert time.perf_counter() - t0 < 5
    assert not (tmp_path / "out").exists()


def test_keep_baseline_must_not_overlap(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export_mod, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    before = tree(ckpt)
    code, _, err = run_cli(capsys, "--keep-baseline = the checkpoint", "export", "--model", ckpt, "--output-dir",
                           tmp_path / "out", "--keep-baseline", ckpt, "--force")
    assert_refused(code, err, "--keep-baseline folder", "is the checkpoint")
    code, _, err = run_cli(capsys, "--keep-baseline = the output folder", "export", "--model", ckpt, "--output-dir",
                           tmp_path / "out", "--keep-baseline", tmp_path / "out")
    assert_refused(code, err, "--keep-baseline folder", "is the output folder")
    assert tree(ckpt) == before


def test_export_keep_baseline_and_force(ckpt, tmp_path, capsys):
    """The one real export here: --keep-baseline gives a folder a later rewrite takes as is (tokenizer
    included), and --force replaces the tool's own outputs while the checkpoint stays byte for byte."""
    before = tree(ckpt)
    out, kept = tmp_path / "out", tmp_path / "kept"
    code, _, err = run_cli(capsys, "export --keep-baseline DIR", "export", "--model", ckpt, "--output-dir", out,
                           "--keep-baseline", kept)
    assert code == 0, err
    assert "export: load" in err and "rewrite: write" in err  # stage lines off a terminal
    assert (kept / "model.onnx").is_file() and (kept / "tokenizer.json").is_file()
    assert not any(p.is_symlink() for p in kept.iterdir())
    assert tree(ckpt) == before
    code, _, err = run_cli(capsys, "export again over its own outputs, --force", "export", "--model", ckpt,
                           "--output_dir", out, "--keep-baseline", kept, "--force", "-q")
    assert code == 0, err
    assert err == ""  # -q: no stage lines, warnings or tables
    assert tree(ckpt) == before and leftovers(tmp_path) == []
    again = tmp_path / "again"
    code, _, err = run_cli(capsys, "rewrite of the kept baseline", kept / "model.onnx", again, "-q")
    assert code == 0, err
    assert (again / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()


# ------------------------------------------------------------------ the command line


def test_every_option_has_help_and_one_spelling():
    for cmd in cli.COMMANDS:
        parser = cli.build_parser(cmd)
        for action in parser._actions:
            assert action.help, (cmd, action.dest)
            long = [o for o in action.option_strings if o.startswith("--")]
            if long:
                assert "_" not in long[0], (cmd, long)  # hyphens first; underscores only as aliases
        dtype = next((a for a in parser._actions if a.dest == "dtype"), None)
        assert dtype is None or dtype.choices == ["float16", "float32"]
    export = cli.build_parser("export")
    args = export.parse_args(["--model", "m", "--output_dir", "o", "--trust_remote_code"])
    assert args.output_dir == "o" and args.trust_remote_code
    args = export.parse_args(["--model", "m", "--output-dir", "o", "--trust-remote-code", "--keep-baseline", "b"])
    assert args.output_dir == "o" and args.trust_remote_code and args.keep_baseline == "b"


def test_tiny_module_help():
    done = subprocess.run([sys.executable, "-m", "onnx_rewriter.hf.tiny", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0 and "usage: python -m onnx_rewriter.hf.tiny" in done.stdout and "llama" in done.stdout


def test_inspect_exit_code_and_warnings_once(base, tmp_path, capsys):
    from .test_errors import break_rotate_half

    code, out, err = run_cli(capsys, "inspect, a graph it would NOT rewrite", "inspect",
                             break_rotate_half(base, tmp_path / "broken"))
    assert code == 1 and "verdict: would NOT rewrite" in out
    code, out, err = run_cli(capsys, "inspect, a graph it would rewrite", "inspect", base)
    assert code == 0 and "verdict: would rewrite all 2 layers" in out
    text = out + err
    assert text.count("head size 16 has no edgellm-0.9 prefill kernel") == 1


def test_verify_quiet_and_rows_labelled(base, tmp_path, capsys):
    out = tmp_path / "out"
    pipeline.rewrite(base, out, dtype="float32")
    code, text, err = run_cli(capsys, "verify -q", "verify", out, "--baseline", base, "--steps", "2", "-q")
    assert code == 0 and text == "" and err == ""
    result = onnx_rewriter.verify(out, baseline=str(base), steps=2, quiet=True)
    assert [s.step for s in result.steps] == ["prefill/row0", "prefill/row1", "decode1/row0", "decode1/row1",
                                              "decode2/row0", "decode2/row1"]




def _child_env():
    return dict(os.environ, PYTHONPATH=str(ROOT))


def test_ctrl_c_mid_write(base, tmp_path):
    out = tmp_path / "out"
    proc, flag = start_mid_write(tmp_path, [base, out], preexec_fn=default_sigint)
    _, err = signal_mid_write(proc, flag, signal.SIGINT)
    record("Ctrl-C mid-write", proc.returncode, err)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines() == [cli.INTERRUPTED] or err.strip().splitlines()[-1] == cli.INTERRUPTED
    assert "Traceback" not in err
    assert_no_output(out)


# Ctrl-C while the lazy torch/transformers imports run, delivered when `transformers` starts importing
# (a fixed sleep raced with how fast the imports are).
CHILD_IMPORTS = """
import os, runpy, signal, sys


class InterruptAt:
    def find_spec(self, name, path=None, target=None):
        if name == "transformers":
            os.kill(os.getpid(), signal.SIGINT)
        return None


sys.meta_path.insert(0, InterruptAt())
sys.argv = ["onnx_rewriter"] + sys.argv[1:]
runpy.run_module("onnx_rewriter", run_name="__main__", alter_sys=True)
"""


def test_ctrl_c_during_imports(base, tmp_path):
    out = tmp_path / "out"
    script = tmp_path / "child.py"
    script.write_text(CHILD_IMPORTS)
    proc = subprocess.Popen([sys.executable, str(script), "export", "--model", base.parent, "--output-dir", out],
                            env=_child_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, preexec_fn=default_sigint)
    _, err = proc.communicate(timeout=120)
    record("Ctrl-C during imports", proc.returncode, err)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert [l for l in err.splitlines() if l.startswith("error:")] == [l for l in err.splitlines() if l.strip()][-1:]
    assert err.strip().splitlines()[-1].startswith("error: interrupted")
    assert_no_output(out)
