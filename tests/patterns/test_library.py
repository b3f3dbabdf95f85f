"""The pattern library as a whole: every module is registered in STAGES and has its own unit tests."""

from __future__ import annotations

from pathlib import Path

from onnx_rewriter import patterns
from onnx_rewriter.patterns import STAGES, VISION_STAGES, load_patterns

HERE = Path(__file__).parent
MODULES = sorted(p.stem for p in Path(patterns.__file__).parent.glob("*.py") if not p.stem.startswith("_"))


def test_every_module_is_registered_once():
    listed = [name for stages in (STAGES, VISION_STAGES) for names in stages.values() for name in names]
    assert sorted(listed) == MODULES


def test_patterns_load_in_declared_order():
    names = [p.name for p in load_patterns()]
    assert names == [name for names in STAGES.values() for name in names]
    assert names.index("rotate_half") < names.index("rope_interleaved")  # the refusal only where rotate_half failed
    assert [p.name for p in load_patterns(VISION_STAGES)] == ["vit_rope", "vit_attention"]


def test_every_pattern_has_its_test_file():
    missing = [m for m in MODULES if not (HERE / f"test_{m}.py").is_file()]
    assert missing == []
