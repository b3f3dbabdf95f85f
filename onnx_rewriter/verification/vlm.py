"""verify for a VLM's `llm/` folder: an image+text prompt and a text-only prompt, batched, against transformers.

What the runtime does, done on the CPU reference:
- image features (and Qwen3-VL's deepstack features) come from transformers' own vision tower and are
  spliced in at the image placeholder tokens (deepstack inputs are zero elsewhere);
- each row's 3-D (t, h, w) positions come from the model's own `get_rope_index` (with `mm_token_type_ids`:
  without it Qwen2.5-VL silently falls back to 1-D positions); generated tokens continue at
  position + rope delta, the same on all three rows;
- the per-row M-RoPE table is built from the folder's config.json (analysis/rope.py
  `runtime_mrope_table`), one table per batch row (0.9) or one row per token (0.11).
The oracle runs each row's whole sequence through the HF model with its pixels, every step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from onnx_rewriter.analysis.rope import runtime_mrope_table
from onnx_rewriter.hf.vlm import encode, load_vlm, synthetic_images, vision_module
from onnx_rewriter.modelio.config_file import read_config
from onnx_rewriter.reference.runner import Session, runner_for
from onnx_rewriter.verification.compare import VerifyResult, compare, judge
from onnx_rewriter.verification.consistency import check_consistency

PROMPT = "Describe the picture in one short sentence."
TEXT_PROMPT = "What is the capital of France?"


def _splice(ids: np.ndarray, base: np.ndarray, token: int, features: np.ndarray) -> np.ndarray:
    """`base` rows with the image-token rows replaced by `features`, in order (ids row-major)."""
    out = base.copy()
    at = np.asarray(ids) == token
    if at.any():
        out[at] = features.astype(out.dtype)
    return out


class VlmSession(Session):
    """A `llm/` folder session that splices image features into the embeddings and feeds deepstack."""

    def __init__(self, out_dir, image_token: int, features: np.ndarray, deepstack: list[np.ndarray]):
        super().__init__(out_dir)
        self.image_token, self.features, self.deepstack = image_token, features, deepstack
        self.rope_table = np.zeros((1, 1, 1), np.float32)  # set per batch by verify_vlm

    def embed(self, ids):
        return _splice(ids, super().embed(ids), self.image_token, self.features)

    def step_inputs(self, ids):
        ids = np.asarray(ids)
        zeros = np.zeros(ids.shape + (self.embedding.shape[-1],), self.float)
        return {f"deepstack_embeds_{i}": _splice(ids, zeros, self.image_token, f) for i, f in enumerate(self.deepstack)}


def _inputs(model: str, vlm, image):
    """(image row encoding, text row encoding) of the two prompts through the chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    with_image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text_only = [{"role": "user", "content": [{"type": "text", "text": TEXT_PROMPT}]}]
    # a template that takes only string content: the same prompts as strings, the image as its placeholder
    as_strings = ([{"role": "user", "content": IMAGE_PLACEHOLDER + PROMPT}],
                  [{"role": "user", "content": TEXT_PROMPT}])
    rows = []
    for msgs, plain, images in ((with_image, as_strings[0], [image]), (text_only, as_strings[1], [])):
        prompt = _render(tok, msgs, plain, model)
        rows.append(encode(model, prompt, images, tokenizer=tok))
    return tok, rows


IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def _render(tok, msgs, plain, model) -> str:
    """The chat template applied to list-of-parts content, or to string content where it takes only that."""
    from ..errors import RewriteError

    errors = []
    for m in (msgs, plain):
        try:
            prompt = tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - the template's own error (TypeError, jinja's), reported below
            errors.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:120])
            continue
        if m is msgs or "<|image_pad|>" in prompt or IMAGE_PLACEHOLDER not in plain[0]["content"]:
            return prompt
        errors.append("the rendered prompt lost the image placeholder")
    raise RewriteError(f"the chat template of '{model}' (chat_template.jinja / tokenizer_config.json) renders "
                       f"neither list nor string message content ({'; '.join(errors)}); fix the template")


def verify_vlm(out_dir, model: str, steps: int = 8, image=None, quiet: bool = False) -> VerifyResult:
    """Run `out_dir` (a `llm/` folder, or the export folder holding it) against the HF VLM `model`."""
    import torch

    root = Path(out_dir)
    if root.name == "llm" and not (root / "llm").is_dir():  # the llm/ folder itself (export --verify)
        root = root.parent
    out_dir = root / "llm" if (root / "llm").is_dir() else root
    Session.check_folder(out_dir)
    failed = check_consistency(out_dir, model, vlm=True, extra=_visual_problems(root, out_dir))
    if failed is not None:
        return failed
    if out_dir == root and not quiet:
        print(f"note: '{out_dir}' is a decoder folder without llm/ and visual/: no vision encoder is checked")
    vlm, config = load_vlm(model)
    image = image if image is not None else synthetic_images()[0]
    tok, (img_row, text_row) = _inputs(model, vlm, image)
    image_token = config.image_token_id
    banned = [tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                      "<|vision_end|>")]
    with torch.no_grad():
        vis = vlm.model.get_image_features(img_row["pixel_values"], img_row["image_grid_thw"], return_dict=True)
        features = torch.cat(vis.pooler_output).float().numpy()
        deep = [torch.cat(f).float().numpy() for f in (getattr(vis, "deepstack_features", None) or [])]
        pos3, delta = vlm.model.get_rope_index(img_row["input_ids"], img_row["mm_token_type_ids"],
                                               img_row["image_grid_thw"])
    session = VlmSession(out_dir, image_token, features, deep)
    cfg = read_config(out_dir / "config.json", fix="rewrite the folder again")
    seqs = [img_row["input_ids"][0].tolist(), text_row["input_ids"][0].tolist()]
    capacity = max(map(len, seqs)) + steps + 1
    # Row b's 3-D position of KV slot s: the prompt's own, then slot + delta on all three rows.
    positions = []
    for b, seq in enumerate(seqs):
        p = np.arange(capacity)[None].repeat(3, 0)
        if b == 0:
            p[:, :len(seq)] = pos3[:, 0].numpy()
            p[:, len(seq):] += int(delta[0, 0])
        positions.append(p)
    session.rope_table = np.stack([runtime_mrope_table(cfg, p) for p in positions])

    def oracle(b, seq):
        ids = torch.tensor([seq])
        kw = {}
        if b == 0:
            kw = dict(pixel_values=img_row["pixel_values"], image_grid_thw=img_row["image_grid_thw"],
                      mm_token_type_ids=(ids == image_token).to(torch.int32))
        vlm.model.rope_deltas = None
        with torch.no_grad():
            return vlm(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).logits[0, -1].float().numpy()

    runner = runner_for(session, len(seqs), capacity=capacity)
    result = VerifyResult()
    ours = runner.prefill([list(s) for s in seqs])
    names = ("image", "text")
    for k in range(steps + 1):
        refs = np.stack([oracle(b, s) for b, s in enumerate(seqs)])
        for b in range(len(seqs)):
            result.steps.append(compare(("prefill" if k == 0 else f"decode{k}") + f"/{names[b]}", ours[b], refs[b]))
        if k == steps:
            break
        masked = refs.copy()
        masked[:, banned] = -np.inf  # a generated image token would need an image
        nxt = [int(r.argmax()) for r in masked]
        for s, t in zip(seqs, nxt):
            s.append(t)
        ours = runner.decode(nxt)
    judge(result, session.float)
    visual = _verify_visual(root, vlm, image, quiet)
    if visual is not None and not visual.passed:
        result.passed = False
        result.criterion += "; and the vision encoder's features match the tower's"
    if not quiet:
        grid = img_row["image_grid_thw"][0].tolist()
        print(f"image row: {int((img_row['input_ids'] == image_token).sum())} image tokens (grid t,h,w {grid}), "
              f"{len(deep)} deepstack level(s), rope delta {int(delta[0, 0])}; text row: 1-D positions")
        print(result.table())
        print(f"verify {'PASSED' if result.passed else 'FAILED'} ({result.criterion})", file=sys.stdout)
    return result


def _visual_problems(root: Path, out_dir: Path) -> list[str]:
    """An export folder (`llm/` inside it) must hold the vision encoder the runtime builds beside the decoder,
    and this install must be able to check it. A bare decoder folder (`rewrite` of a VLM's text baseline) has
    no encoder to check: a note says so."""
    if out_dir == root:
        return []
    visual = root / "visual" / "model.onnx"
    if not visual.is_file():
        return [f"{visual}: missing: the runtime needs the vision encoder beside llm/; export the model again "
                f"(with an install that has onnx_rewriter.vision)"]
    try:
        from ..vision import verify_visual  # noqa: F401
    except ImportError as exc:
        return [f"{root / 'visual'}: cannot be checked: onnx_rewriter.vision is not installed ({exc}); "
                f"reinstall onnx_rewriter"]
    return []


def _verify_visual(root: Path, vlm, image, quiet: bool):
    """The `visual/` encoder beside `llm/`, by onnx_rewriter.vision when both are there; else None."""
    if not (root / "visual" / "model.onnx").is_file():
        return None
    verify_visual = vision_module().verify_visual  # torch-heavy (~5 s); _visual_problems checked it imports
    res = verify_visual(root, vlm, images=[image])
    if not quiet:
        print(f"visual/: {res.table()}\nvisual {'PASSED' if res.passed else 'FAILED'} ({res.criterion})")
    return res
