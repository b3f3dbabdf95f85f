"""The built wheel ships every package of the tree. A hand-written package list once left out
onnx_rewriter.vision: an editable install hid it, a wheel exported VLMs without their visual/ encoder."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("onnx_rewriter", "patterns", "setup.py", "setup.cfg", "pyproject.toml", "README.md")


def _py_folders(base: Path, installed_as: str) -> set[str]:
    """Every folder under `base` holding .py files, named as it lies in the wheel."""
    return {"/".join([installed_as, *p.parent.relative_to(base).parts]) for p in base.rglob("*.py")
            if "__pycache__" not in p.parts}


def test_wheel_ships_every_package(tmp_path):
    # A copy of the sources: a stale build/ in the checkout would be packed too and could hide an omission.
    src = tmp_path / "src"
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                         if (ROOT / name).is_dir() else {}))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("onnx_rewriter-*.whl")
    shipped = {n.rsplit("/", 1)[0] for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    tree = _py_folders(ROOT / "onnx_rewriter", "onnx_rewriter") | _py_folders(ROOT / "patterns",
                                                                              "onnx_rewriter/patterns")
    assert "onnx_rewriter/vision" in tree and "onnx_rewriter/patterns" in tree
    assert not tree - shipped, f"folders missing from the wheel: {sorted(tree - shipped)}"
