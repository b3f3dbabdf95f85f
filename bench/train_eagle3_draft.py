"""Train a small EAGLE3 draft for SmolLM2-135M-Instruct (the demo model) by self-distillation, on the CPU.

    .venv/bin/python bench/train_eagle3_draft.py --base demo/checkpoint --out bench/.cache/smol-eagle3

1. data: the base answers TRAIN_PROMPTS (chat template, greedy, batched transformers generate with a KV cache),
   then one teacher-forced pass per batch over prompt + answer gives, for every position, the base's hidden
   states entering the tapped layers (the EAGLE3 `hidden_states` input) and its greedy prediction (the target).
   Cached in OUT/data.pt: a rerun trains again without generating.
2. draft vocabulary: the DRAFT_VOCAB most frequent base predictions (plus the special tokens); d2t / t2d.
3. model: hf/eagle3_draft.py's module (the checkpoint format `export --eagle-draft` reads), started from the base:
   lm_head = the base's (tied) embedding rows of the draft vocabulary, norm = the base's final norm, the decoder
   layer from the base's last layer (its q/k/v read the hidden half of the 2H input), fc = the last tap.
4. training: cross-entropy to the base's greedy token, unrolled over TTT steps as EAGLE3 trains ("training-time
   test"): step 1 reads the base's taps; step k reads the draft's own hidden state of step k-1 and the base's
   token, attending to step 1's keys up to its row and to its own chain (what a tree node sees at the runtime).
5. writes OUT/config.json and OUT/model.safetensors (no embed_tokens: the base's table is used), prints the
   held-out top-1 / top-10 accuracy per step (a proxy for the accepted length).

`--evaluate PAIR` instead runs the CPU-reference speculative greedy decoding of an exported pair on HELD_OUT_PROMPTS
(verification/eagle3.py: tokens identical to transformers' greedy, mean accepted length per prompt).
Everything runs on one thread (torch and OpenBLAS): on 2 cores shared with other jobs two threads were 7x slower.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: the reference's BLAS on one thread too
import numpy as np  # noqa: E402

TOPICS = [
    "the Roman Empire", "photosynthesis", "black holes", "the French Revolution", "machine learning",
    "the water cycle", "volcanoes", "the human heart", "climate change", "the printing press", "honey bees",
    "the stock market", "electric cars", "the Great Wall of China", "vaccines", "the Moon landing", "coral reefs",
    "democracy", "the Internet", "earthquakes", "ancient Egypt", "renewable energy", "the solar system",
    "chess", "coffee", "the Olympic Games", "DNA", "rainforests", "the Industrial Revolution", "jazz music",
    "gravity", "the immune system", "bread baking", "recycling", "the Amazon river", "quantum computers",
    "dinosaurs", "the Renaissance", "sleep", "volunteering", "public speaking", "time management",
    "learning a new language", "healthy eating", "the Cold War", "penguins", "smartphones", "the ocean tides",
    "Shakespeare", "the periodic table", "bicycles", "mountains", "friendship", "the Sahara desert",
    "electricity", "the brain", "tea", "airplanes", "the Pyramids", "social media", "saving money",
]
TEMPLATES = [
    "What is {t}?", "Explain {t} in simple terms.", "Write a short paragraph about {t}.",
    "Give me three facts about {t}.", "Why is {t} important?", "Describe {t} to a child.",
]
# held out: other topics and other phrasings than any training prompt
HELD_OUT_PROMPTS = [
    "How do rainbows form?", "Can you summarize the history of the bicycle industry in Europe?",
    "What are the benefits of regular exercise?", "Tell me a short story about a lost cat.",
    "How does a refrigerator keep food cold?", "What should I pack for a weekend camping trip?",
]

DRAFT_VOCAB = 8192


def train_prompts() -> list[str]:
    return [tpl.format(t=t) for t in TOPICS for tpl in TEMPLATES]


def chat_ids(tok, question: str) -> list[int]:
    return [int(i) for i in tok.apply_chat_template([{"role": "user", "content": question}],
                                                    add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"]]


def generate(model, tok, questions, new_tokens: int, batch: int, eos: int) -> list[list[int]]:
    """prompt + greedy answer (cut after the first eos) of each question."""
    import torch

    out = []
    for b in range(0, len(questions), batch):
        rows = [chat_ids(tok, q) for q in questions[b:b + batch]]
        width = max(map(len, rows))
        ids = torch.tensor([[eos] * (width - len(r)) + r for r in rows])  # left padding
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        t = time.time()
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=eos)[:, width:].tolist()
        for r, g in zip(rows, gen):
            g = g[:g.index(eos) + 1] if eos in g else g
            out.append(r + g)
        n = sum(len(g) for g in gen)
        print(f"  generated {b + len(rows)}/{len(questions)} answers ({n / (time.time() - t):.0f} tokens/s)",
              flush=True)
    return out


def default_layers(num_layers: int) -> list[int]:
    """edgellm's default taps ([2, L//2, L-3]: 2, 15, 27 for SmolLM2's 30 layers), clamped for tiny models."""
    return sorted({min(max(i, 0), num_layers - 1) for i in (2, num_layers // 2, num_layers - 3)}) \
        if num_layers >= 6 else [0, num_layers // 2, num_layers - 1]


def teacher(model, seqs, layers, batch: int = 8):
    """Per sequence: taps [n, 3H] (fp16) and the base's greedy prediction at every position [n]."""
    import torch

    taps, preds = [], []
    for b in range(0, len(seqs), batch):
        rows = seqs[b:b + batch]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])  # right padding: rows unaffected
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hs = torch.cat([out.hidden_states[i] for i in layers], dim=-1)
        am = out.logits.argmax(-1)
        for j, r in enumerate(rows):
            taps.append(hs[j, :len(r)].half())
            preds.append(am[j, :len(r)])
    return taps, preds


def build_data(base: str, out: Path, new_tokens: int, batch: int, max_prompts: int | None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = out / "data.pt"
    if cache.is_file():
        return torch.load(cache)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    eos = int(model.config.eos_token_id)
    layers = default_layers(model.config.num_hidden_layers)
    data = {"layers": layers}
    for name, questions in (("train", train_prompts()[:max_prompts]), ("held_out", HELD_OUT_PROMPTS)):
        t = time.time()
        seqs = generate(model, tok, questions, new_tokens, batch, eos)
        taps, preds = teacher(model, seqs, layers)
        data[name] = {"ids": [torch.tensor(s) for s in seqs], "taps": taps, "preds": preds}
        print(f"{name}: {len(seqs)} sequences, {sum(map(len, seqs))} tokens ({time.time() - t:.0f}s)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(data, cache)
    return data


def draft_config(base_cfg: dict, vd: int, layers: list[int]) -> dict:
    b = base_cfg
    return {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
        "hidden_size": b["hidden_size"], "intermediate_size": b["intermediate_size"],
        "num_attention_heads": b["num_attention_heads"], "num_key_value_heads": b["num_key_value_heads"],
        "head_dim": b.get("head_dim") or b["hidden_size"] // b["num_attention_heads"], "num_hidden_layers": 1,
        "rms_norm_eps": b["rms_norm_eps"], "max_position_embeddings": b["max_position_embeddings"],
        "rope_parameters": b["rope_parameters"], "vocab_size": b["vocab_size"], "draft_vocab_size": vd,
        "target_hidden_size": b["hidden_size"], "target_layer_ids": layers, "bos_token_id": b.get("bos_token_id"),
        "eos_token_id": b.get("eos_token_id"), "pad_token_id": b.get("pad_token_id"), "tie_word_embeddings": False,
        "dtype": "float32",
    }


def init_from_base(draft, base_state: dict, vocab_ids, num_layers: int) -> None:
    """Start from the base: its head restricted to the draft vocabulary, its final norm, its last decoder layer
    (q/k/v: the hidden half of the 2H input; the embedding half starts at zero), fc = the last tap."""
    import torch

    h = draft.config.hidden_size
    last = f"model.layers.{num_layers - 1}."
    head = base_state.get("lm_head.weight", base_state["model.embed_tokens.weight"])
    with torch.no_grad():
        draft.lm_head.weight.copy_(head[vocab_ids])
        draft.norm.weight.copy_(base_state["model.norm.weight"])
        m = draft.midlayer
        for name in ("input_layernorm", "post_attention_layernorm"):
            getattr(m, name).weight.copy_(base_state[last + name + ".weight"])
        m.hidden_norm.weight.copy_(base_state[last + "input_layernorm.weight"])
        for p in ("q_proj", "k_proj", "v_proj"):
            w = getattr(m.self_attn, p).weight
            w.zero_()
            w[:, h:].copy_(base_state[last + f"self_attn.{p}.weight"])
            w[:, :h].normal_(0, 0.002)
        m.self_attn.o_proj.weight.copy_(base_state[last + "self_attn.o_proj.weight"])
        for p in ("gate_proj", "up_proj", "down_proj"):
            getattr(m.mlp, p).weight.copy_(base_state[last + f"mlp.{p}.weight"])
        draft.fc.weight.zero_()
        draft.fc.weight[:, 2 * h:].copy_(torch.eye(h))


def unrolled(draft, embed, taps, ids, ttt: int):
    """Logits of steps 1..ttt for one batch: taps [B, S, 3H], ids [ttt, B, S] (each step's tokens, batches()).
    Step k, row i sits at position i + k - 1 and predicts the base's greedy token after it."""
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m, att = draft.midlayer, draft.midlayer.self_attn
    cfg = draft.config
    b, s, _ = taps.shape
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.head_dim
    hidden = draft.fc(taps)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    k1 = v1 = None
    chain_k, chain_v = [], []
    logits = []
    for k in range(ttt):
        pos = torch.arange(s).unsqueeze(0) + k
        cos, sin = draft.rotary_emb(hidden, position_ids=pos)
        x = torch.cat([m.input_layernorm(embed(ids[k])), m.hidden_norm(hidden)], dim=-1)
        q = att.q_proj(x).view(b, s, nh, d).transpose(1, 2)
        kk = att.k_proj(x).view(b, s, nkv, d).transpose(1, 2)
        vv = att.v_proj(x).view(b, s, nkv, d).transpose(1, 2)
        q, kk = apply_rotary_pos_emb(q, kk, cos, sin)
        rep = nh // nkv
        kk, vv = kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1)
        if k == 0:
            k1, v1 = kk, vv
        else:
            chain_k.append(kk)
            chain_v.append(vv)
        scale = d ** -0.5
        scores = (q @ k1.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~causal, float("-inf"))
        diag = [(q * ck).sum(-1, keepdim=True) * scale for ck in chain_k]  # [B, h, S, 1] each
        p = torch.softmax(torch.cat([scores, *diag], dim=-1), dim=-1)
        o = p[..., :s] @ v1
        for j, cv in enumerate(chain_v):
            o = o + p[..., s + j:s + j + 1] * cv
        o = o.transpose(1, 2).reshape(b, s, nh * d)
        hidden = hidden + att.o_proj(o)
        hidden = hidden + m.mlp(m.post_attention_layernorm(hidden))
        logits.append(draft.lm_head(draft.norm(hidden)))
    return logits


def batches(split, t2d_index, seq: int, ttt: int, rng, batch: int):
    """Windows of `seq` rows: taps [B, S, 3H]; ids [ttt, B, S]: step 1, row i reads the sequence's token i+1,
    step k the base's prediction at i+k-1 (step k-1's target: the token on the greedy chain); targets [ttt, B, S]:
    the base's prediction at i+k (draft ids, -100 outside the draft vocabulary or the sequence)."""
    import torch

    windows = []
    for n, ids in enumerate(split["ids"]):
        for start in range(0, max(1, len(ids) - 2), seq):
            windows.append((n, start))
    order = rng.permutation(len(windows))
    for b0 in range(0, len(order), batch):
        chunk = [windows[i] for i in order[b0:b0 + batch]]
        tb = torch.zeros(len(chunk), seq, split["taps"][0].shape[-1])
        ib = torch.zeros(ttt, len(chunk), seq, dtype=torch.long)
        tg = torch.full((ttt, len(chunk), seq), -100, dtype=torch.long)
        for j, (n, start) in enumerate(chunk):
            ids, taps, preds = split["ids"][n], split["taps"][n], split["preds"][n]
            rows = min(seq, len(ids) - 1 - start)
            tb[j, :rows] = taps[start:start + rows].float()
            ib[0, j, :rows] = ids[start + 1:start + 1 + rows]
            for k in range(1, ttt):
                p = preds[start + k:start + k + rows]
                ib[k, j, :len(p)] = p
            for k in range(ttt):
                p = preds[start + k + 1:start + k + 1 + rows]
                tg[k, j, :len(p)] = t2d_index[p]
        yield tb, ib, tg


def accuracy(draft, embed, split, t2d_index, ttt: int, seq: int) -> list[tuple[float, float]]:
    import torch

    hits = [[0, 0, 0] for _ in range(ttt)]
    with torch.no_grad():
        for tb, ib, tg in batches(split, t2d_index, seq, ttt, np.random.default_rng(0), 8):
            for k, lg in enumerate(unrolled(draft, embed, tb, ib, ttt)):
                ok = tg[k] >= 0
                top = lg.topk(10, -1).indices
                hits[k][0] += int((top[..., 0] == tg[k])[ok].sum())
                hits[k][1] += int((top == tg[k][..., None]).any(-1)[ok].sum())
                hits[k][2] += int(ok.sum())
    return [(a / max(n, 1), b / max(n, 1)) for a, b, n in hits]


def train(args) -> int:
    import torch
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from onnx_rewriter.hf.eagle3_draft import WEIGHTS, build_module

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    t0 = time.time()
    data = build_data(args.base, out, args.new_tokens, args.gen_batch, args.max_prompts)
    print(f"data ready ({time.time() - t0:.0f}s)", flush=True)
    base_cfg = json.loads((Path(args.base) / "config.json").read_text())
    vocab = int(base_cfg["vocab_size"])
    counts = np.bincount(torch.cat(data["train"]["preds"]).numpy(), minlength=vocab)
    special = [i for i in (base_cfg.get("bos_token_id"), base_cfg.get("eos_token_id"), base_cfg.get("pad_token_id"),
                           base_cfg.get("unk_token_id")) if i is not None]
    rank = counts.copy()
    rank[special] = counts.sum() + 1  # always in the draft vocabulary
    vd = min(args.draft_vocab, vocab)
    vocab_ids = np.sort(np.argsort(-rank, kind="stable")[:vd])
    print(f"draft vocabulary: {vd} tokens cover {counts[vocab_ids].sum() / counts.sum():.1%} of the base's greedy "
          f"predictions on the training text", flush=True)
    t2d_index = torch.full((vocab,), -100, dtype=torch.long)
    t2d_index[torch.from_numpy(vocab_ids)] = torch.arange(vd)

    cfg = draft_config(base_cfg, vd, data["layers"])
    draft = build_module(cfg)
    base_state = load_file(str(Path(args.base) / "model.safetensors"))
    if args.init:  # go on training a draft this script wrote (the same data: the same vocabulary)
        state = load_file(str(Path(args.init) / WEIGHTS))
        if not torch.equal(state["d2t"], torch.from_numpy(vocab_ids - np.arange(vd))):
            raise SystemExit(f"--init {args.init}: its draft vocabulary is not this data's")
        draft.load_state_dict({**draft.state_dict(), **{k: v for k, v in state.items() if k not in ("d2t", "t2d")}})
    else:
        init_from_base(draft, base_state, torch.from_numpy(vocab_ids), int(base_cfg["num_hidden_layers"]))
    embed = torch.nn.Embedding.from_pretrained(base_state["model.embed_tokens.weight"].float(), freeze=True)
    params = [p for n, p in draft.named_parameters() if not n.startswith("embed_tokens")]
    for n, p in draft.named_parameters():
        p.requires_grad_(not n.startswith("embed_tokens"))
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    print("held-out before training (top-1, top-10 per step):",
          [(round(a, 3), round(b, 3)) for a, b in accuracy(draft, embed, data["held_out"], t2d_index, args.ttt,
                                                             args.seq)], flush=True)
    steps_per_epoch = sum(1 for _ in batches(data["train"], t2d_index, args.seq, args.ttt,
                                              np.random.default_rng(0), args.batch))
    total = steps_per_epoch * args.epochs
    step, t1 = 0, time.time()
    rng = np.random.default_rng(args.seed)
    draft.train()
    for epoch in range(args.epochs):
        for tb, ib, tg in batches(data["train"], t2d_index, args.seq, args.ttt, rng, args.batch):
            lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            for g in opt.param_groups:
                g["lr"] = lr
            logits = unrolled(draft, embed, tb, ib, args.ttt)
            loss = sum(torch.nn.functional.cross_entropy(lg.reshape(-1, vd), tg[k].reshape(-1), ignore_index=-100)
                       * (0.8 ** k) for k, lg in enumerate(logits))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            if step % 20 == 0 or step == total:
                print(f"  step {step}/{total} (epoch {epoch + 1}) loss {loss.item():.3f} "
                      f"({time.time() - t1:.0f}s)", flush=True)
    draft.eval()
    acc = accuracy(draft, embed, data["held_out"], t2d_index, args.ttt, args.seq)
    print("held-out after training (top-1, top-10 per step):", [(round(a, 3), round(b, 3)) for a, b in acc])
    state = {k: v.detach().contiguous() for k, v in draft.state_dict().items() if not k.startswith("embed_tokens")}
    state["d2t"] = torch.from_numpy(vocab_ids - np.arange(vd)).to(torch.int64)
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[torch.from_numpy(vocab_ids)] = True
    state["t2d"] = t2d
    save_file(state, str(out / WEIGHTS))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    print(f"wrote {out} ({time.time() - t0:.0f}s in all)")
    return 0


def evaluate(args) -> int:
    """Speculative greedy decoding of the exported pair on HELD_OUT_PROMPTS, checked against transformers."""
    import torch
    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from onnx_rewriter.verification.eagle3 import verify_eagle3

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(args.base)
    prompts = [chat_ids(tok, q) for q in HELD_OUT_PROMPTS[:args.prompts]]
    t = time.time()
    result = verify_eagle3(args.evaluate, args.base, draft_checkpoint=args.out, new_tokens=args.eval_tokens,
                           prompts=prompts)
    print(f"mean accepted length over {len(prompts)} held-out prompts: {np.mean(result.mean_accepted):.2f} "
          f"tokens per base call ({time.time() - t:.0f}s)")
    return 0 if result.passed else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="demo/checkpoint", help="the SmolLM2 checkpoint (python -m onnx_rewriter.demo)")
    p.add_argument("--out", default="bench/.cache/smol-eagle3", help="the draft checkpoint folder")
    p.add_argument("--new-tokens", type=int, default=96, help="greedy tokens per training answer")
    p.add_argument("--gen-batch", type=int, default=32)
    p.add_argument("--max-prompts", type=int, default=None, help="train on the first N prompts only (smoke test)")
    p.add_argument("--draft-vocab", type=int, default=DRAFT_VOCAB)
    p.add_argument("--ttt", type=int, default=3, help="unrolled draft steps per training row")
    p.add_argument("--seq", type=int, default=64, help="rows per training window")
    p.add_argument("--batch", type=int, default=16, help="windows per step")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", metavar="DRAFT", help="start from a draft this script wrote instead of the base")
    p.add_argument("--evaluate", metavar="PAIR", help="an exported pair (export --eagle-draft OUT): measure it instead")
    p.add_argument("--prompts", type=int, default=len(HELD_OUT_PROMPTS), help="with --evaluate: held-out prompts")
    p.add_argument("--eval-tokens", type=int, default=32, help="with --evaluate: speculative tokens per prompt")
    args = p.parse_args(argv)
    return evaluate(args) if args.evaluate else train(args)


if __name__ == "__main__":
    sys.exit(main())
