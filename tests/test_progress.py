"""What a long run shows: on a terminal a bar over the weights written (bytes, rate, ETA), elsewhere one line
per stage (progress.py), and with -q neither."""

from __future__ import annotations

import io
import re
import sys

import pytest

from onnx_rewriter import cli


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _rewrite(models, tmp_path, *extra):
    return cli.main([str(models.baseline("llama")), str(tmp_path / "out"), "--no-tokenizer", *extra])


def test_off_a_terminal_one_line_per_stage(models, tmp_path, capsys):
    models.baseline("llama")
    capsys.readouterr()  # what building the fixture printed
    assert _rewrite(models, tmp_path) == 0
    err = capsys.readouterr().err
    stages = re.findall(r"^rewrite: (\w+) \(\d+\.\ds\)$", err, re.M)
    assert stages[:2] == ["load", "normalize"] and "write" in stages
    assert "\r" not in err and "weights" not in err  # no bar


def test_on_a_terminal_bars_instead(models, tmp_path, monkeypatch):
    models.baseline("llama")
    tty = _Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    assert _rewrite(models, tmp_path) == 0
    text = tty.getvalue()
    assert not re.search(r"^rewrite: \w+ \(", text, re.M)  # no stage lines
    assert re.search(r"\rrewrite: +\d+%", text) and "\rweights: " in text  # the steps' bar, the weights' bar


def test_weights_bar_shows_bytes_rate_and_eta(monkeypatch):
    """The bar graph.save draws over the weights it writes (a tiny model's are all too small to count)."""
    from onnx_rewriter import progress

    tty = _Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.setattr(progress, "_quiet", False)
    with progress.bar(total=3 << 30, desc="weights", nbytes=True) as pb:
        pb.update(1 << 30)
        pb.refresh()
    last = [line for line in tty.getvalue().split("\r") if line.startswith("weights:")][-1]
    # percent, GB written of the total, elapsed<remaining (the ETA), rate
    assert re.search(r"33%.*1\.00G/3\.00G \[\d\d:\d\d<\d\d:\d\d, +[\d.]+[kMGT]?B/s\]", last), last


def test_quiet_shows_neither(models, tmp_path, monkeypatch):
    tty = _Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    assert _rewrite(models, tmp_path, "-q") == 0
    assert "weights" not in tty.getvalue() and "rewrite:" not in tty.getvalue()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
