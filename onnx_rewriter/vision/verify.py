"""verify for the vision encoder: the rewritten graph on the CPU reference vs transformers' own tower.

The encoder inputs are made from the folder's own config.json as the runtime makes them (vision/host.py),
the graph runs in onnx.reference with the numpy ViTAttentionPlugin, and every output (`output`, each
`deepstack_features_i`) is compared with the tower's pooler output / deepstack features (fp32).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ..reference.ops import reference_evaluator
from . import host

# fp16 graph vs fp32 tower: max error relative to the largest reference value, and cosine per output.
MAX_REL = 2e-2
MIN_COSINE = 0.9995


@dataclass
class OutputCheck:
    name: str
    shape: tuple
    max_abs: float
    rel: float
    cosine: float

    @property
    def passed(self) -> bool:
        return self.rel <= MAX_REL and self.cosine >= MIN_COSINE


@dataclass
class VisualResult:
    outputs: list[OutputCheck] = field(default_factory=list)
    criterion: str = f"per output: max|ours - tower| <= {MAX_REL} * max|tower| and cosine >= {MIN_COSINE}"

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(o.passed for o in self.outputs)

    def table(self) -> str:
        rows = [f"{'output':<24}{'shape':>12}{'max_abs':>11}{'rel':>11}{'cosine':>11}"]
        for o in self.outputs:
            rows.append(f"{o.name:<24}{'x'.join(map(str, o.shape)):>12}{o.max_abs:>11.3e}{o.rel:>11.3e}"
                        f"{o.cosine:>11.6f}  {'ok' if o.passed else 'FAIL'}")
        return "\n".join(rows)


def check(name: str, ours: np.ndarray, ref: np.ndarray) -> OutputCheck:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        return OutputCheck(name, ours.shape, float("inf"), float("inf"), 0.0)
    err = float(np.abs(ours - ref).max())
    cos = float(ours.ravel() @ ref.ravel() / max(np.linalg.norm(ours) * np.linalg.norm(ref), 1e-30))
    return OutputCheck(name, ours.shape, err, err / max(float(np.abs(ref).max()), 1e-12), cos)


def process_images(folder: Path, images, image_processor=None) -> tuple[np.ndarray, np.ndarray]:
    """(pixel_values fp32 [N, C*Tp*P*P], grid_thw [n, 3]) from the folder's preprocessor_config.json."""
    if image_processor is None:
        import transformers

        image_processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(folder, local_files_only=True)
    out = image_processor(images=list(images), return_tensors="np")
    return np.asarray(out["pixel_values"], dtype=np.float32), np.asarray(out["image_grid_thw"], dtype=np.int64)


def run_folder(folder: Path, feeds: dict) -> dict:
    model = onnx.load(str(folder / "model.onnx"))
    names = [o.name for o in model.graph.output]
    return dict(zip(names, reference_evaluator(model).run(None, feeds)))


def tower_outputs(visual, pixel_values: np.ndarray, grid_thw: np.ndarray) -> dict:
    import torch

    with torch.no_grad():
        out = visual(torch.from_numpy(pixel_values).to(visual.dtype), grid_thw=torch.from_numpy(grid_thw))
    result = {"output": out.pooler_output.float().numpy()}
    for i, feat in enumerate(getattr(out, "deepstack_features", None) or []):
        result[f"deepstack_features_{i}"] = feat.float().numpy()
    return result


def encoder_feeds(folder: Path, config: dict, pixel_values, grid_thw) -> dict:
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    elem = next(i.type.tensor_type.elem_type for i in model.graph.input if i.name == "input")
    return host.encoder_inputs(config["model_type"], pixel_values, grid_thw, config["vision_config"],
                               float_type=onnx.helper.tensor_dtype_to_np_dtype(elem))


def compare_with_tower(folder: Path, config: dict, visual, pixel_values, grid_thw, feeds: dict | None = None):
    """`feeds`: encoder inputs to run instead of the host's own (tests pass deliberately wrong ones)."""
    feeds = feeds if feeds is not None else encoder_feeds(folder, config, pixel_values, grid_thw)
    ours = run_folder(folder, feeds)
    ref = tower_outputs(visual, pixel_values, grid_thw)
    result = VisualResult()
    for name, value in ours.items():
        result.outputs.append(check(name, value, ref[name]) if name in ref
                              else OutputCheck(name, np.shape(value), float("inf"), float("inf"), 0.0))
    return result
