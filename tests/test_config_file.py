"""The one config.json reader (modelio/config_file.py): a dict, or one error line naming the file and the fix."""

from __future__ import annotations

import pytest

from onnx_rewriter.errors import RewriteError
from onnx_rewriter.modelio.config_file import read_config


def test_reads_an_object(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 64}')
    assert read_config(tmp_path / "config.json") == {"hidden_size": 64}


@pytest.mark.parametrize("text,words", [(None, ["not readable JSON", "No such file"]),
                                        ("{not json", ["not readable JSON"]),
                                        (b"\xff\xfe", ["not readable JSON"]),
                                        ("[1, 2]", ["holds a JSON list, not an object"])])
def test_one_line_naming_the_file_and_the_fix(tmp_path, text, words):
    path = tmp_path / "config.json"
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    with pytest.raises(RewriteError) as info:
        read_config(path, fix="rewrite the folder again")
    msg = str(info.value)
    assert "\n" not in msg and f"'{path}'" in msg and msg.endswith("; rewrite the folder again")
    assert all(w in msg for w in words), msg
