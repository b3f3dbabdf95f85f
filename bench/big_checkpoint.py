"""A random-weight bf16 checkpoint of a real model's dimensions, written shard by shard (bench sizes 3b, 8b, moe).

    .venv/bin/python bench/big_checkpoint.py OUT CONFIG_CLASS '{"hidden_size": ...}' [--shard-gb 5]

What `save_pretrained` writes (config.json with dtype bfloat16, model-0000i-of-0000n.safetensors shards of at
most --shard-gb, model.safetensors.index.json, the tiny tokenizer of onnx_rewriter.hf.tiny), without ever
holding the model in memory: the names and shapes come from the model built on the meta device, each shard's
header is computed first and its tensors are written one after the other from a 64 MB pool of random bf16
values (N(0, 0.02); norms 1, biases N(0, 0.02)), at a random offset into it per tensor. Peak ~0.3 GB at 8B.
Only for timing and memory: the weights are not a trained model's, and they repeat.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import numpy as np

POOL = 32 << 20  # bf16 values (64 MB)


def _pool(rng) -> np.ndarray:
    f32 = (rng.standard_normal(POOL, dtype=np.float32) * 0.02).view(np.uint32)
    return ((f32 + 0x7FFF + ((f32 >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even


def plan(config) -> list[tuple[str, tuple]]:
    """(name, shape) of every tensor save_pretrained writes (a tied lm_head is not written), in its order."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    seen, out = set(), []
    for name, p in model.state_dict(keep_vars=True).items():
        if id(p) in seen:  # tied: lm_head.weight is model.embed_tokens.weight
            continue
        seen.add(id(p))
        out.extend(_per_expert(name, tuple(p.shape)))
    return out


def _per_expert(name: str, shape: tuple) -> list[tuple[str, tuple]]:
    """transformers 5 holds MoE experts stacked (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]);
    save_pretrained and the releases store them per expert (`experts.{e}.gate_proj.weight`, ...), which loading
    stacks again: written per expert here too."""
    if name.endswith("experts.gate_up_proj"):
        e, two_i, h = shape
        base = name.removesuffix("gate_up_proj")
        return [(f"{base}{x}.{p}.weight", (two_i // 2, h)) for x in range(e) for p in ("gate_proj", "up_proj")]
    if name.endswith("experts.down_proj"):
        e, h, i = shape
        return [(f"{name.removesuffix('down_proj')}{x}.down_proj.weight", (h, i)) for x in range(e)]
    return [(name, shape)]


def shards(tensors, shard_bytes: int) -> list[list[tuple[str, tuple]]]:
    groups, size = [[]], 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += n
    return groups


def write_shard(path: Path, tensors, pool: np.ndarray, rng) -> int:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    one = np.full(1 << 20, 0x3F80, np.uint16)  # bf16 1.0
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text)
        for name, shape in tensors:
            left = int(np.prod(shape))
            norm = name.endswith("norm.weight")
            while left:
                k = min(left, 8 << 20)
                if norm:
                    fh.write(one[: min(k, one.size)].tobytes())
                    k = min(k, one.size)
                else:
                    start = int(rng.integers(0, pool.size - k + 1))
                    fh.write(pool[start:start + k].data)
                left -= k
    return 8 + len(text) + offset


def build(out: Path, config_class: str, dims: dict, shard_gb: float = 5.0, seed: int = 0) -> Path:
    import transformers

    from onnx_rewriter.hf import tiny

    out = Path(out)
    tiny.build_tokenizer(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    config = getattr(transformers, config_class)(**dims)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, None
    config.dtype = "bfloat16"
    config.architectures = [config_class.replace("Config", "ForCausalLM")]
    groups = shards(plan(config), int(shard_gb * 1e9))
    rng = np.random.default_rng(seed)
    pool = _pool(rng)
    weight_map, total = {}, 0
    for i, group in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        total += write_shard(out / name, group, pool, rng)
        weight_map.update({t: name for t, _ in group})
        print(f"  {name}: {(out / name).stat().st_size / 1e9:.2f} GB", file=sys.stderr, flush=True)
    params = sum(int(np.prod(s)) for g in groups for _, s in g)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": params * 2, "total_parameters": params}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(out)  # last: config.json marks a finished checkpoint (bench/run.py)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("config_class")
    p.add_argument("dims")
    p.add_argument("--shard-gb", type=float, default=5.0)
    args = p.parse_args(argv)
    build(Path(args.out), args.config_class, json.loads(args.dims), args.shard_gb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
