"""The EAGLE3 draft model as a small torch module (transformers has no class for it).

An HF EAGLE3 checkpoint (SpecForge / EAGLE `LlamaForCausalLMEagle3` style) holds one Llama-like decoder
layer and the pieces around it:

    config.json   architectures [...Eagle3...], hidden_size, num_attention_heads, num_key_value_heads,
                  head_dim, intermediate_size, rms_norm_eps, rope_theta / rope_parameters,
                  vocab_size (the base model's), draft_vocab_size, target_hidden_size (default hidden_size),
                  target_layer_ids (optional: the base layers whose input residual streams it reads)
    weights       midlayer.{input_layernorm, hidden_norm, post_attention_layernorm}.weight
                  midlayer.self_attn.{q,k,v,o}_proj.weight   (q/k/v read 2·hidden_size)
                  midlayer.mlp.{gate,up,down}_proj.weight
                  fc.weight [H, 3·H_t], norm.weight, lm_head.weight [draft_vocab_size, H]
                  d2t int64 [draft_vocab_size] (target id = draft id + d2t[draft id]), t2d bool [vocab_size]
                  embed_tokens.weight (optional; otherwise the base model's table is used)

One step (as NVIDIA's draft graph computes it, contract part 2 §11.2):

    h = hidden_states_from_draft + fc(hidden_states_input)           # fc: 3·H_t -> H, no bias
    x = concat(input_layernorm(embeds), hidden_norm(h))              # 2H
    h = h + o_proj(attention(x))                                      # residual is h, not x
    h = h + mlp(post_attention_layernorm(h))
    logits = lm_head(norm(h))  (draft vocabulary); the next step is fed h (pre-norm)

The first step after the base model gets hidden_states_input = the base's [B, S, 3·H_t] taps and
hidden_states_from_draft = 0; later steps get hidden_states_input = 0 and the draft's own h.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import RewriteError

WEIGHTS = "model.safetensors"


def is_eagle3_config(cfg: dict) -> bool:
    """NVIDIA's rule: "Eagle3" in `architectures`, or a `ttt_length` key."""
    return any("eagle3" in str(a).lower() for a in cfg.get("architectures") or []) or "ttt_length" in cfg


def read_draft_config(folder) -> dict:
    path = Path(folder) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RewriteError(f"cannot read the EAGLE3 draft config '{path}' ({exc}); give a draft checkpoint folder") \
            from None
    if not isinstance(cfg, dict) or not is_eagle3_config(cfg):
        raise RewriteError(f"'{path}' is not an EAGLE3 draft config (no 'Eagle3' in architectures, no ttt_length)")
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size"):
        if not isinstance(cfg.get(key), int):
            raise RewriteError(f"EAGLE3 draft config '{path}' has no integer '{key}'")
    return cfg


def target_layer_ids(cfg: dict) -> list[int] | None:
    """The base layers the draft was trained on (`target_layer_ids`, or eagle_config's aux layer ids)."""
    ids = cfg.get("target_layer_ids")
    if ids is None:
        ids = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    return [int(i) for i in ids] if ids else None


def llama_config(cfg: dict):
    """A transformers LlamaConfig for the draft's layer (what its attention and MLP are built from)."""
    from transformers import LlamaConfig

    keep = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "auto_map")}
    keep["num_hidden_layers"] = 1
    c = LlamaConfig(**keep)
    c._attn_implementation = "eager"
    return c


def build_module(cfg: dict):
    """The draft module (random weights), its parameter names those of the checkpoint."""
    import torch
    from torch import nn
    from transformers.models.llama import modeling_llama as ml

    config = llama_config(cfg)
    h = config.hidden_size
    ht = int(cfg.get("target_hidden_size") or h)
    vd = int(cfg.get("draft_vocab_size") or config.vocab_size)
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads

    class MidLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm = ml.LlamaRMSNorm(h, eps=config.rms_norm_eps)
            self.hidden_norm = ml.LlamaRMSNorm(h, eps=config.rms_norm_eps)
            self.post_attention_layernorm = ml.LlamaRMSNorm(h, eps=config.rms_norm_eps)
            self.self_attn = ml.LlamaAttention(config, layer_idx=0)
            bias = config.attention_bias
            # q/k/v read concat(norm(embeds), norm(h)): 2H wide
            self.self_attn.q_proj = nn.Linear(2 * h, config.num_attention_heads * d, bias=bias)
            self.self_attn.k_proj = nn.Linear(2 * h, config.num_key_value_heads * d, bias=bias)
            self.self_attn.v_proj = nn.Linear(2 * h, config.num_key_value_heads * d, bias=bias)
            self.mlp = ml.LlamaMLP(config)

        def forward(self, embeds, hidden, position_embeddings, mask, cache=None):
            x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
            attn, _ = self.self_attn(x, position_embeddings=position_embeddings, attention_mask=mask, cache=cache)
            hidden = hidden + attn
            return hidden + self.mlp(self.post_attention_layernorm(hidden))

    class Eagle3Draft(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = config
            self.target_hidden_size, self.draft_vocab_size = ht, vd
            self.midlayer = MidLayer()
            self.fc = nn.Linear(3 * ht, h, bias=False)
            self.norm = ml.LlamaRMSNorm(h, eps=config.rms_norm_eps)
            self.lm_head = nn.Linear(h, vd, bias=False)
            self.embed_tokens = nn.Embedding(config.vocab_size, h)
            self.rotary_emb = ml.LlamaRotaryEmbedding(config=config)
            self.register_buffer("d2t", torch.zeros(vd, dtype=torch.int64))
            self.register_buffer("t2d", torch.ones(config.vocab_size, dtype=torch.bool))

        def forward(self, input_ids, attention_mask, hidden_states_input, hidden_states_from_draft,
                    position_ids=None, cache=None):
            """(logits over the draft vocabulary, pre-norm h) for every token; `attention_mask` [B, S] (padding),
            causal over the call (and `cache`, a transformers Cache, when given)."""
            from transformers.masking_utils import create_causal_mask

            embeds = self.embed_tokens(input_ids)
            hidden = hidden_states_from_draft + self.fc(hidden_states_input)
            if position_ids is None:
                past = cache.get_seq_length() if cache is not None else 0
                position_ids = (torch.arange(embeds.shape[1], device=embeds.device) + past).unsqueeze(0)
            mask = create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=attention_mask,
                                      cache=cache, position_ids=position_ids)
            pe = self.rotary_emb(hidden, position_ids=position_ids)
            hidden = self.midlayer(embeds, hidden, pe, mask, cache)
            return self.lm_head(self.norm(hidden)), hidden

    return Eagle3Draft()


def load_draft(folder, base_embedding=None, dtype=None):
    """The draft of checkpoint `folder` (eval mode). Without `embed_tokens.weight` in the checkpoint the
    base model's table `base_embedding` ([V, H] tensor) is needed; `t2d` is optional (NVIDIA drops it)."""
    import torch
    from safetensors.torch import load_file

    cfg = read_draft_config(folder)
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise RewriteError(f"EAGLE3 draft '{folder}' has no *.safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    model = build_module(cfg)
    if "embed_tokens.weight" not in state:
        if base_embedding is None:
            raise RewriteError(f"EAGLE3 draft '{folder}' has no embed_tokens.weight; the base model's embedding is "
                               f"needed (export it with the base model)")
        state["embed_tokens.weight"] = base_embedding
    if "t2d" not in state:
        state["t2d"] = model.t2d
    if "d2t" not in state:
        raise RewriteError(f"EAGLE3 draft '{folder}' has no d2t tensor (draft id -> base id offsets)")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(k for k in set(state) - set(own))
    if missing or unexpected:
        raise RewriteError(f"EAGLE3 draft '{folder}' does not fit its config: missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}")
    bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        k = bad[0]
        raise RewriteError(f"EAGLE3 draft '{folder}': '{k}' is {tuple(state[k].shape)}, its config says "
                           f"{tuple(own[k].shape)}")
    state["d2t"] = state["d2t"].to(torch.int64)
    state["t2d"] = state["t2d"].to(torch.bool)
    model.load_state_dict(state)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def build_tiny_draft(base_dir, out_dir, *, seed: int = 0, draft_vocab_size: int | None = None,
                     target_layer_ids: list[int] | None = None, with_embedding: bool = False, **overrides):
    """A random EAGLE3 draft for the tiny base model in `base_dir` (hf/tiny.py), in the checkpoint format above.

    The draft vocabulary is a random sorted subset of the base vocabulary (half of it by default) that always
    holds the special tokens; d2t holds offsets, t2d the membership mask. `overrides` are set on the draft's
    config (a narrower draft needs `with_embedding`: its own table)."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from .tiny import perturb

    base = json.loads((Path(base_dir) / "config.json").read_text())
    vocab = int(base["vocab_size"])
    vd = int(draft_vocab_size or vocab // 2)
    cfg = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
        "hidden_size": base["hidden_size"], "intermediate_size": base["intermediate_size"],
        "num_attention_heads": base["num_attention_heads"], "num_key_value_heads": base["num_key_value_heads"],
        "head_dim": base.get("head_dim") or base["hidden_size"] // base["num_attention_heads"],
        "num_hidden_layers": 1, "rms_norm_eps": base.get("rms_norm_eps", 1e-6),
        "max_position_embeddings": base["max_position_embeddings"],
        "rope_parameters": base.get("rope_parameters") or {"rope_type": "default",
                                                           "rope_theta": base.get("rope_theta", 10000.0)},
        "vocab_size": vocab, "draft_vocab_size": vd, "target_hidden_size": base["hidden_size"],
        "bos_token_id": base.get("bos_token_id"), "eos_token_id": base.get("eos_token_id"),
        "pad_token_id": base.get("pad_token_id"), "tie_word_embeddings": False, "initializer_range": 0.1,
        "dtype": "float32",
    }
    cfg.update(overrides)  # e.g. a draft narrower than the base (hidden_size != target_hidden_size)
    if target_layer_ids is not None:
        cfg["target_layer_ids"] = [int(i) for i in target_layer_ids]
    torch.manual_seed(seed)
    model = build_module(cfg)
    perturb(model, seed)
    rng = np.random.default_rng(seed)
    keep = set(int(i) for i in (base.get("bos_token_id"), base.get("eos_token_id"), base.get("pad_token_id"))
               if i is not None)
    rest = rng.permutation([i for i in range(vocab) if i not in keep])[:vd - len(keep)]
    ids = np.array(sorted(keep | {int(i) for i in rest}), dtype=np.int64)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    state["d2t"] = torch.from_numpy(ids - np.arange(vd))
    t2d = np.zeros(vocab, dtype=bool)
    t2d[ids] = True
    state["t2d"] = torch.from_numpy(t2d)
    if not with_embedding:
        del state["embed_tokens.weight"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / WEIGHTS))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m onnx_rewriter.hf.eagle3_draft",
                                description="Build a tiny random EAGLE3 draft for a tiny base checkpoint (tests).")
    p.add_argument("base_dir")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-layer-ids", default=None, help="comma-separated base layers, e.g. 1,2,3")
    a = p.parse_args(argv)
    ids = [int(x) for x in a.target_layer_ids.split(",")] if a.target_layer_ids else None
    print(build_tiny_draft(a.base_dir, a.out_dir, seed=a.seed, target_layer_ids=ids))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def export_draft_baseline(model, path: Path, opset: int | None = None) -> Path:
    """The plain export of the draft (dynamo, no KV cache), what `rewrite --eagle-draft` reads:
    inputs input_ids, attention_mask [B, S], hidden_states_input [B, S, 3·H_t], hidden_states_from_draft [B, S, H];
    outputs logits [B, S, V_d] and hidden_states [B, S, H] (pre-norm). The embedding table is the base's."""
    import gc
    import logging
    import warnings

    import torch

    from . import checkpoint_refs
    from .trace import _no_stack_traces, _optimize

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, hidden_states_input, hidden_states_from_draft):
            return self.m(input_ids, attention_mask, hidden_states_input, hidden_states_from_draft)

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    ids = torch.ones((2, 8), dtype=torch.int64)
    h, ht = model.config.hidden_size, model.target_hidden_size
    dt = next(model.parameters()).dtype
    args = (ids, torch.ones_like(ids), torch.zeros((2, 8, 3 * ht), dtype=dt), torch.zeros((2, 8, h), dtype=dt))
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=32768)
    dims = {0: batch, 1: seq}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        with _no_stack_traces():
            prog = torch.onnx.export(
                Wrapper(model), args, dynamo=True, optimize=False, opset_version=opset, verbose=False,
                input_names=["input_ids", "attention_mask", "hidden_states_input", "hidden_states_from_draft"],
                output_names=["logits", "hidden_states"],
                dynamic_shapes={"input_ids": dims, "attention_mask": dims, "hidden_states_input": dims,
                                "hidden_states_from_draft": dims})
        _optimize(prog)
        checkpoint_refs.save(prog, Path(path), model, ())
        del prog
        gc.collect()
    from safetensors.torch import save_file

    # what the rewrite writes as d2t.safetensors, beside the baseline where it looks for it
    save_file({"d2t": model.d2t.detach().to(torch.int64).contiguous()}, str(Path(path).parent / "d2t.safetensors"))
    return Path(path)
