"""Vision encoders of VLMs (Qwen2.5-VL, Qwen3-VL): export, rewrite to ViTAttentionPlugin, side files, verify.

`export_visual(model, out_dir, target)` writes `<out_dir>/visual/` (model.onnx + model.onnx.data,
config.json, preprocessor_config.json); `verify_visual(out_dir, model, images)` runs it on the CPU
reference and compares with transformers' own vision tower. docs/contract.md, "Vision encoder".
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np

from ..errors import RewriteError, UnsupportedModel
from ..modelio.config_file import read_config
from . import plugin, sidefiles
from .towers import TOWERS

__all__ = ["FAMILIES", "export_visual", "precheck", "tower_of", "verify_visual"]

FAMILIES = tuple(TOWERS)
DTYPES = {"float16": np.float16, "float32": np.float32}


def family_of(config) -> str:
    family = getattr(config, "model_type", None)
    if family not in TOWERS:
        raise UnsupportedModel(f"no vision encoder route for model_type '{family}'; supported: {', '.join(FAMILIES)}")
    return family


def tower_of(model):
    """transformers 5 keeps the tower at `model.model.visual`; older layouts at `model.visual`."""
    inner = getattr(model, "model", None)
    visual = getattr(inner, "visual", None) or getattr(model, "visual", None)
    if visual is None:
        raise UnsupportedModel(f"{type(model).__name__} has no vision tower (.model.visual)")
    return visual


def check_options(config, target, dtype: str) -> str:
    """Validate before any slow step; returns the family. `target`: a Target, or its name."""
    plugin.check_target(target)
    if dtype not in DTYPES:
        raise RewriteError(f"unknown dtype '{dtype}' for the vision encoder; choose one of: {', '.join(DTYPES)}")
    return family_of(config)


def precheck(config, target, dtype: str, checkpoint=None) -> tuple[str, Path | None]:
    """Everything export_visual can refuse before the slow steps (target, dtype, family, the checkpoint's
    preprocessor config). Returns (family, checkpoint folder)."""
    family = check_options(config, target, dtype)
    checkpoint = checkpoint or getattr(config, "_name_or_path", None)
    checkpoint = Path(checkpoint) if checkpoint else None
    sidefiles.preprocessor_config(checkpoint)
    return family, checkpoint


def export_visual(model, out_dir, target="edgellm-0.9", dtype: str = "float16", checkpoint=None,
                  force: bool = False, plain=None, keep_plain=None) -> dict:
    """Export and rewrite `model`'s vision tower into `<out_dir>/visual/`; returns the report.

    `checkpoint`: the checkpoint folder (for preprocessor_config.json); default the model's own path.
    `plain`: a plain export of this tower made before (`keep_plain`, same dtype): skips the torch export.
    """
    import torch

    from .. import safety
    from ..modelio.output import OutputDir
    from . import export, rewrite

    target = plugin.check_target(target)  # a Target from here on
    family, checkpoint = precheck(model.config, target, dtype, checkpoint)
    visual = copy.deepcopy(tower_of(model)).to(getattr(torch, dtype)).eval()
    work = safety.make_temp("visual")  # a killed run's is removed by the next
    try:
        if plain is None:
            plain = export.export_tower(family, visual, work / "plain.onnx", float_type=DTYPES[dtype])
            if keep_plain is not None:
                shutil.copyfile(plain, keep_plain)
        feeds = export.example_feeds(family, visual, DTYPES[dtype])
        with OutputDir(Path(out_dir) / "visual", force=force) as tmp:
            report = rewrite.rewrite(plain, tmp / "model.onnx", visual.config, target, feeds)
            report["files"] = ["model.onnx", "model.onnx.data", *sidefiles.write(tmp, model.config, checkpoint)]
            report["family"] = family
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def verify_visual(out_dir, model, images=None, pixel_values=None, grid_thw=None, image_processor=None):
    """Run `<out_dir>/visual/model.onnx` on the CPU reference and compare with the model's vision tower.

    Give `images` (processed with `image_processor`, default the folder's preprocessor_config.json) or
    `pixel_values` and `grid_thw` directly. Returns a `verify.VisualResult`."""
    from . import verify

    folder = Path(out_dir) / "visual" if (Path(out_dir) / "visual" / "model.onnx").is_file() else Path(out_dir)
    if not (folder / "model.onnx").is_file():
        raise RewriteError(f"'{out_dir}' has no visual/model.onnx; give a folder written by export_visual")
    if pixel_values is None:
        if not images:
            raise RewriteError("verify_visual needs images (or pixel_values and grid_thw)")
        pixel_values, grid_thw = verify.process_images(folder, images, image_processor)
    config = read_config(folder / "config.json", fix="export the visual folder again")
    return verify.compare_with_tower(folder, config, tower_of(model), np.asarray(pixel_values), np.asarray(grid_thw))
