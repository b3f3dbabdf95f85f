"""Qwen2.5-VL / Qwen3-VL: the text decoder's plain export and the two-part `make export` folder.

The baseline of the text decoder is what a plain export of the HF decoder computes, with the inputs the
model's own multimodal forward feeds it: `input_ids`, `attention_mask`, `position_ids` [3, B, S] (the
t/h/w rows of M-RoPE; the section interleave is computed in the graph) and, for Qwen3-VL, one
`deepstack_embeds_{i}` [B, S, H] per deepstack level, added to the hidden state after decoder layer i
(zeros at text tokens, which is what HF's masked add computes). The rewrite then matches the M-RoPE
table (patterns/mrope_table.py) and the VLM feature (features/vlm.py) shapes the rest per target.
"""

from __future__ import annotations

import gc
import json
import logging
import warnings
from pathlib import Path

from onnx_rewriter import progress, safety
from onnx_rewriter.pipeline import steps as pipeline

from ..errors import RewriteError
from ..features.vlm import check_target
from ..modelio.config_file import read_config
from ..modelio.output import OutputDir
from . import checkpoint_refs
from .mapped_model import mapped_model
from .trace import _keep, _light_decomposition, _optimize, check_quantization, trace_dtype

log = logging.getLogger(__name__)

VLM_MODEL_TYPES = ("qwen2_5_vl", "qwen3_vl")


def vlm_type(model: str) -> str | None:
    """The VLM model_type of a local checkpoint folder, or None (a text LLM, or not a folder)."""
    cfg = Path(model) / "config.json"
    if not cfg.is_file():
        return None
    try:
        kind = read_config(cfg).get("model_type")
    except RewriteError:
        return None
    return kind if kind in VLM_MODEL_TYPES else None


def num_deepstack(config) -> int:
    """Nd: one deepstack input per vision deepstack index (0 for Qwen2.5-VL)."""
    vision = getattr(config, "vision_config", None)
    return len(getattr(vision, "deepstack_visual_indexes", None) or [])


def load_vlm(model: str, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False,
             mapped_files=()):
    """The HF VLM (Qwen*VLForConditionalGeneration) and its config, from a local folder, on `device`.

    `mapped_files`: the checkpoint's safetensors files, to build the model with its weights mapped from them
    (mapped_model.py: nothing is read until used; the export traces the text decoder without reading it) where
    they hold each weight in `dtype`; loaded otherwise. `dtype` "export": the checkpoint's own when bf16 or
    fp16, else fp32 (trace.trace_dtype)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from .. import safety

    trust = safety.remote_code(trust_remote_code)  # and never a prompt
    fmt = check_quantization(Path(model))  # refuses what no route reads
    if fmt is not None:  # transformers would read an FP8 checkpoint's codes as weights: never by accident
        raise RewriteError(f"'{model}': {fmt.name}: the vision-language route reads unquantized checkpoints only; "
                           f"export the fp16/bf16 model it was made from")
    try:
        config = AutoConfig.from_pretrained(model, local_files_only=True, **trust)
        if dtype == "export":  # what `export` traces in: a bf16/fp16 checkpoint as it is (mapped), else fp32
            dtype = trace_dtype(config)
        m = None
        if mapped_files:  # attn_implementation None: the class's default, as from_pretrained below picks it
            quantized = getattr(config, "quantization_config", None) is not None
            m = mapped_model(model, config, getattr(torch, dtype), mapped_files, device,
                             trust.get("trust_remote_code", False), quantized, None, auto=AutoModelForImageTextToText)
        if m is not None:
            log.info("export: traced with the weights mapped from the checkpoint, not loaded")
            return m, config
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = AutoModelForImageTextToText.from_pretrained(model, dtype=getattr(torch, dtype), local_files_only=True,
                                                            **trust)
    except (OSError, ValueError) as exc:
        raise safety.remote_code_error(exc, model) or RewriteError(
            f"cannot load the VLM '{model}': {str(exc).splitlines()[0][:160]}") from None
    return m.to(device).eval(), config


def text_decoder(vlm):
    """forward(input_ids, attention_mask, position_ids[3,B,S], deepstack tuple) -> logits, no cache."""
    import torch

    lm, head = vlm.model.language_model, vlm.lm_head
    nd = num_deepstack(vlm.config)

    class TextDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm, self.head = lm, head
            self._deepstack = ()
            # hidden = layer_i(hidden) + deepstack_i for i < Nd, as the runtime's graph computes it
            for i in range(nd):
                lm.layers[i].register_forward_hook(self._add(i))

        def _add(self, i):
            def hook(module, args, output):
                return output + self._deepstack[i] if self._deepstack else output
            return hook

        def forward(self, input_ids, attention_mask, position_ids, deepstack=()):
            self._deepstack = deepstack
            embeds = self.lm.embed_tokens(input_ids)
            out = self.lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False)
            self._deepstack = ()
            return self.head(out.last_hidden_state)

    return TextDecoder().eval()


def export_text_baseline(vlm, config, path: Path, checkpoint=()) -> Path:
    """The text decoder's plain dynamo export (fp32, or bf16 for a bf16 checkpoint) to `path`; config.json beside it.

    `checkpoint`: the model's safetensors files: the baseline references the weights where they lie
    (checkpoint_refs.py: mapped ones as they are, loaded ones where their bytes are the file's) instead of
    copying them into its own data file, as the text route's baseline does."""
    import torch

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    nd = num_deepstack(config)
    hidden = config.text_config.hidden_size
    dev = next(vlm.parameters()).device  # --device: the inputs where the model is
    ids = torch.ones((2, 8), dtype=torch.int64, device=dev)
    mask = torch.ones_like(ids)
    pos = torch.arange(8, device=dev).view(1, 1, -1).expand(3, 2, -1).contiguous()
    float_type = vlm.lm_head.weight.dtype  # fp32, or bf16 where a bf16 checkpoint is traced as it is
    deep = tuple(torch.zeros((2, 8, hidden), dtype=float_type, device=dev) for _ in range(nd))
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=32768)
    dyn = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}, "position_ids": {1: batch, 2: seq}}
    args = (ids, mask, pos)
    if nd:
        dyn["deepstack"], args = tuple({0: batch, 1: seq} for _ in range(nd)), args + (deep,)
    names = ["input_ids", "attention_mask", "position_ids"] + [f"deepstack_embeds_{i}" for i in range(nd)]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        with _light_decomposition():
            prog = torch.onnx.export(text_decoder(vlm), args, dynamo=True, optimize=False,
                                     dynamic_shapes=dyn, input_names=names, output_names=["logits"],
                                     verbose=False)
        if checkpoint:
            _optimize(prog, keep_weights=True)  # Transpose(weight) left to the rewrite: the weight stays mapped
            checkpoint_refs.save(prog, path, vlm, checkpoint)
        else:
            _optimize(prog)
            prog.save(str(path))
        del prog
        gc.collect()
    (path.parent / "config.json").write_text(json.dumps(config.to_dict(), default=str))
    return path


def export_vlm(model: str, output_dir, opts, device: str = "cpu", keep_baseline: str | None = None):
    """`make export` of a Qwen VLM: `<out>/llm/` (the rewritten text decoder) and `<out>/visual/` (the
    vision encoder, by `onnx_rewriter.vision.export_visual` when that module is installed). Returns the
    LLM rewrite run. `opts` and every path were checked by export.precheck, as on the text route."""
    out = safety.resolved(output_dir)

    check_target(opts.target)  # before the slow steps: a target the contract has no VLM route for
    vision_module()  # before the slow steps too: the encoder's exporter is there
    with progress.stages(["load", "export", "rewrite", "visual"], "export") as advance:
        advance("load")
        files = checkpoint_refs.checkpoint_files(model)
        vlm, config = load_vlm(model, "export", device, opts.trust_remote_code, mapped_files=files)
        _precheck_visual(config, model, opts)  # a missing preprocessor config fails now, not after the LLM
        with safety.temp_folder("vlm") as work:
            advance("export")
            with safety.os_errors(f"cannot write the baseline export in '{work}'",
                                  "free some space there or point TMPDIR at a folder with room"):
                try:
                    base = export_text_baseline(vlm, config, work / "model.onnx", checkpoint=files)
                finally:
                    checkpoint_refs.unmap()  # the vision tower's mapped weights stay (they close with `vlm`)
            vlm.to("cpu")  # the vision export and the rewrite's checks run on the CPU
            if opts.tokenizer is None and not opts.no_tokenizer:
                opts.tokenizer = Path(model)
            with OutputDir(out, force=opts.force) as tmp:
                advance("rewrite")
                run = pipeline.rewrite(base, tmp / "llm", opts)
                advance("visual")
                _visual(vlm, model, tmp, opts)
            run.out_dir = out / "llm"  # where the rewrite's folder now lies
            if keep_baseline:
                _keep(work, keep_baseline, opts.force)
            return run


def vision_module():
    """onnx_rewriter.vision, which writes and verifies visual/: a VLM folder without its encoder is no VLM
    folder, so an install that lacks it (or its imports) fails in one line instead of writing llm/ only."""
    try:
        import onnx_rewriter.vision as vision  # by its full name: a module missing from sys.modules fails here
    except ImportError as exc:
        raise RewriteError(f"the VLM's visual/ encoder needs onnx_rewriter.vision, which does not import ({exc}); "
                           f"reinstall onnx_rewriter (pip install --force-reinstall onnx_rewriter)") from None
    return vision


def _precheck_visual(config, model: str, opts) -> None:
    vision_module().precheck(config, opts.target, opts.dtype, checkpoint=model)


def _visual(vlm, model: str, out: Path, opts) -> None:
    # writes out/visual/
    vision_module().export_visual(vlm, out, target=opts.target, dtype=opts.dtype, checkpoint=model)


# The VLM's inputs: what the Qwen-VL processor makes of a prompt and its images (verify feeds them), and a
# deterministic image for checks that need one.
def synthetic_images(sizes=((112, 112), (56, 84))):
    """A few deterministic RGB PIL images (gradients and stripes), one per (height, width)."""
    import numpy as np
    from PIL import Image

    images = []
    for n, (h, w) in enumerate(sizes):
        y, x = np.mgrid[0:h, 0:w]
        rgb = np.stack([(x * 255) // max(w - 1, 1), (y * 255) // max(h - 1, 1),
                        ((x // (4 + n) + y // 7) % 2) * 255], axis=-1)
        images.append(Image.fromarray(rgb.astype(np.uint8), "RGB"))
    return images


def load_image_processor(path):
    """The checkpoint's image processor (PIL backend), offline.

    AutoProcessor also builds the video processor, which needs torchvision (not installed: it pins its own
    torch), and the Qwen processors refuse to be built without one; `encode` does their image part.
    """
    import transformers

    return transformers.Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)


def encode(path, text: str, images=(), tokenizer=None, image_processor=None) -> dict:
    """What the Qwen-VL processor returns for one chat-formatted `text` and its `images`, as torch tensors.

    Each `<|image_pad|>` in `text` (one per image, in order) becomes one token per merged patch
    (grid t*h*w / merge_size**2); `mm_token_type_ids` marks them 1 (text 0), which Qwen2.5-VL needs to
    compute its 3-D positions at all.
    """
    import torch
    from transformers import AutoTokenizer

    tok = tokenizer or AutoTokenizer.from_pretrained(path, local_files_only=True)
    out = {}
    if images:
        proc = image_processor or load_image_processor(path)
        pix = proc(images=list(images), return_tensors="pt")
        out["pixel_values"], out["image_grid_thw"] = pix["pixel_values"], pix["image_grid_thw"]
        merge = proc.merge_size ** 2
        parts = text.split("<|image_pad|>")
        if len(parts) != len(images) + 1:
            raise ValueError(f"{len(parts) - 1} <|image_pad|> in the text for {len(images)} images")
        text = parts[0] + "".join("<|image_pad|>" * int(g.prod() // merge) + rest
                                  for g, rest in zip(out["image_grid_thw"], parts[1:]))
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]], dtype=torch.long)
    out["input_ids"] = ids
    out["attention_mask"] = torch.ones_like(ids)
    out["mm_token_type_ids"] = (ids == tok.convert_tokens_to_ids("<|image_pad|>")).to(torch.int32)
    return out
