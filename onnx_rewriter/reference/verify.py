"""verify: run a rewritten folder (prefill + greedy decode) and compare logits with an oracle.

The oracle is the HF model (`--model`) or the baseline ONNX it was rewritten from (`--baseline`, run
with onnxruntime). Each row's full sequence goes through the oracle on its own, so padding and caches
on the oracle side cannot hide an error on ours. Greedy tokens follow the oracle.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .. import progress
from .checks import check_baseline, check_steps
from .runner import Session, runner_for

log = logging.getLogger(__name__)

FP32_REL = 1e-4
FP16_COSINE = 0.999
# fp16 top-1 may differ only where the oracle's own top-2 are closer than this share of its largest |logit|:
# a fixed tie, ~4x the relative logit error of correct fp16 runs (<= 2.3e-3 on the tiny families). A tie
# measured by the step's own error would switch the check off exactly when the graph is most wrong.
TOP1_TIE = 1e-2
# An FP8 KV cache must cost no more than this (logit cosine vs the model, every step): a scale that saturates
# or underflows the cache passes the tight check (the oracle rounds with the same scales) but fails here.
# Correct calibrated scales measured >= 0.9968 on the tiny families.
FP8_COSINE = 0.99


@dataclass
class StepResult:
    step: str
    max_abs: float
    rel: float
    cosine: float
    top1_agree: bool
    top1_checked: bool


@dataclass
class VerifyResult:
    steps: list[StepResult] = field(default_factory=list)
    criterion: str = ""
    passed: bool = False
    rope_table_difference: float | None = None
    rope_checks: list = field(default_factory=list)  # rope_check.RopeCheck per group of layers
    # INT4 / FP8-KV folders: the oracle above (dequantized weights, FP8 cache rounding) against the original
    # model, per step; `quantized` names what differs
    quantization: list[StepResult] = field(default_factory=list)
    reduced_vocab: tuple[int, int] | None = None  # (kept, full) for a --reduce-vocab folder
    quantized: str = "INT4"

    def quantization_line(self) -> str:
        q = self.quantization
        agree = sum(s.top1_agree for s in q)
        return (f"{self.quantized} quantization error (quantized oracle vs original model, same tokens): min cosine "
                f"{min(s.cosine for s in q):.6f}, mean cosine {np.mean([s.cosine for s in q]):.6f}, "
                f"top-1 agreement {agree}/{len(q)}")

    def table(self) -> str:
        rows = [f"{'step':<14}{'max_abs':>11}{'rel':>11}{'cosine':>11}  top1"]
        for s in self.steps:
            top = ("same" if s.top1_agree else "DIFF") + ("" if s.top1_checked else " (margin tiny)")
            rows.append(f"{s.step:<14}{s.max_abs:>11.3e}{s.rel:>11.3e}{s.cosine:>11.6f}  {top}")
        return "\n".join(rows)


class HFOracle:
    def __init__(self, model: str, lora_adapter: str | None = None):
        from ..hf.export import load_model

        self.model, self.config = load_model(model)
        if lora_adapter:  # transformers + PEFT, the adapter merged into the weights
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, str(lora_adapter)).merge_and_unload().eval()

    def __call__(self, seq: list[int]) -> np.ndarray:
        import torch

        with torch.no_grad():
            ids = torch.tensor([seq])
            return self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float().numpy()


class OnnxOracle:
    def __init__(self, path: str):
        from pathlib import Path

        import onnxruntime as ort

        from ..errors import RewriteError

        if not Path(path).is_file():
            raise RewriteError(f"baseline '{path}' does not exist; give the .onnx file the folder was rewritten from")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # ORT fuses int4 DequantizeLinear + MatMul into MatMulNBits computing with int8 activations by
        # default (2% off the graph's own math); the oracle must compute what the graph says.
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.sess.get_inputs()]

    def __call__(self, seq: list[int]) -> np.ndarray:
        ids = np.asarray([seq], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                 "position_ids": np.arange(len(seq), dtype=np.int64)[None]}
        out = self.sess.run(None, {k: v for k, v in feeds.items() if k in self.names})[0]
        return np.asarray(out, dtype=np.float32)[0, -1]


def compare(step: str, ours: np.ndarray, ref: np.ndarray) -> StepResult:
    err = np.abs(ours - ref)
    max_abs = float(err.max())
    rel = max_abs / max(float(np.abs(ref).max()), 1e-12)
    cos = float(np.dot(ours, ref) / max(np.linalg.norm(ours) * np.linalg.norm(ref), 1e-30))
    top2 = np.sort(ref)[-2:]
    margin = float(top2[1] - top2[0])
    tie = TOP1_TIE * max(float(np.abs(ref).max()), 1e-12)
    return StepResult(step, max_abs, rel, cos, int(ours.argmax()) == int(ref.argmax()), margin > tie)


def prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    """Two ragged prompts (batch-2, right-padded prefill)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, 11).tolist(), rng.integers(3, vocab, 6).tolist()]


def check_rope_tables(result: VerifyResult, out_dir, hf_config, rope) -> np.ndarray | None:
    """Fills result.rope_checks (reference/rope_check.py: each layer's table, as the runtime or the graph
    provides it, vs the model's over every position). Returns the model's table when `rope == "model"`
    asks to feed it instead of the runtime's."""
    from .rope import model_rope_table
    from .rope_check import check_rope

    try:
        result.rope_checks = check_rope(out_dir, hf_config)
        result.rope_table_difference = max((c.max_abs for c in result.rope_checks), default=None)
        return model_rope_table(hf_config, 512) if rope == "model" else None
    except (ValueError, KeyError, AttributeError) as exc:
        log.info("model RoPE table not computed: %s", exc)
        return None


def verify(out_dir, model: str | None = None, baseline: str | None = None, steps: int = 8, rope: str = "runtime",
           rows: list[list[int]] | None = None, quiet: bool = False, lora_adapter: str | None = None,
           fp16_model: str | None = None) -> VerifyResult:
    """`fp16_model`: the unquantized model an AWQ/GPTQ checkpoint (`model`) was made from; the INT4 cost is
    reported against it."""
    check_steps(steps)
    from ..hf.vlm import vlm_type

    if model and vlm_type(model) and baseline is None and rows is None:  # image+text and text-only prompts
        from .vlm_verify import verify_vlm

        return verify_vlm(out_dir, model, steps=steps, quiet=quiet)
    Session.check_folder(out_dir)  # before loading an oracle: a wrong folder fails fast
    if baseline is not None:
        check_baseline(baseline)
    # the graph once, without external weights: LoRA inputs, FP8 scales and INT4 nodes are read from it
    graph = onnx.load(str(Path(out_dir) / "model.onnx"), load_external_data=False)
    lora = _lora_feeds(graph, out_dir, model, lora_adapter)
    oracle = HFOracle(model, lora_adapter) if model else OnnxOracle(baseline)
    original = _int4_oracle(graph, out_dir, model, lora_adapter)
    if original is not None:  # compare with the dequantized model; report the INT4 cost separately
        oracle, original = original, oracle
    elif fp16_model:
        original = HFOracle(fp16_model)
    int4 = original is not None
    result = VerifyResult()
    rope_table = None
    if isinstance(oracle, HFOracle):
        rope_table = check_rope_tables(result, out_dir, oracle.config, rope)
    if not isinstance(rope, str):  # an explicit [P, R] table (e.g. a model's own scaled frequencies)
        rope_table = np.asarray(rope, dtype=np.float32)
    session = Session(out_dir, rope_table=rope_table, lora=lora)
    # reduced vocabulary: our logits are the oracle's at the kept ids; greedy picks among the kept ids
    cut = (lambda x: x) if session.vocab_map is None else (lambda x: x[..., session.vocab_map])
    if session.vocab_map is not None:
        result.reduced_vocab = (len(session.vocab_map), int(session.config["vocab_size"]))
    rows = rows or prompts(session.config["vocab_size"])
    from ..features.fp8_kv import graph_scales

    fp8_scales = graph_scales(graph)
    if fp8_scales:  # the oracle rounds the cache as the runtime does; the FP8 cost is reported apart
        if not isinstance(oracle, HFOracle):
            from ..errors import RewriteError

            raise RewriteError("verify --baseline cannot simulate the folder's FP8 KV cache; verify with --model")
        from .fp8_oracle import Fp8Oracle

        if original is None:
            original = HFOracle(model)
        result.quantized = "FP8 KV cache" if result.quantized == "INT4" and not int4 else "INT4 + FP8 KV cache"
        oracle = Fp8Oracle(oracle, fp8_scales, rows)
    runner = runner_for(session, len(rows), capacity=max(map(len, rows)) + steps + 1)
    seqs = [list(r) for r in rows]
    pb = progress.bar(total=steps + 1, desc="verify")  # prefill + decode steps, on a terminal only
    ours = runner.prefill(seqs)
    for k in range(steps + 1):
        refs = cut(np.stack([oracle(s) for s in seqs]))
        pb.update()
        for b in range(len(seqs)):
            result.steps.append(compare(("prefill" if k == 0 else f"decode{k}") + f"/row{b}", ours[b], refs[b]))
            if original is not None:
                result.quantization.append(compare(result.steps[-1].step, refs[b], cut(original(seqs[b]))))
        if k == steps:
            break
        nxt = [session.token(r.argmax()) for r in refs]
        for s, t in zip(seqs, nxt):
            s.append(t)
        ours = runner.decode(nxt)
    pb.close()
    judge(result, session.float)
    if fp8_scales and not int4:
        result.criterion += f"; FP8 KV cache cost: cosine >= {FP8_COSINE} vs the model at every step"
        result.passed = result.passed and all(s.cosine >= FP8_COSINE for s in result.quantization)
    if any(not c.ok for c in result.rope_checks):  # logits of short prompts cannot show a long-context error
        result.passed = False
        result.criterion += "; every layer's RoPE table equals the model's up to max_position_embeddings"
    if not quiet:
        out = sys.stdout
        print(result.table(), file=out)
        for check in result.rope_checks:
            print(check.line(), file=out)
        if result.quantization:
            print(result.quantization_line(), file=out)
        if result.reduced_vocab:
            print(f"reduced vocabulary: logits compared at the {result.reduced_vocab[0]} kept ids of "
                  f"{result.reduced_vocab[1]}; greedy tokens mapped through vocab_map", file=out)
        print(f"verify {'PASSED' if result.passed else 'FAILED'} ({result.criterion})", file=out)
    return result


def judge(result: VerifyResult, float_type) -> None:
    """The pass rule for the folder's float type: fp32 exact to rounding, fp16 by cosine and top-1."""
    if float_type == np.float32:
        result.criterion = f"fp32: relative error <= {FP32_REL} and identical top-1 at every step"
        result.passed = all(s.rel <= FP32_REL and s.top1_agree for s in result.steps)
    else:
        result.criterion = (f"fp16: cosine >= {FP16_COSINE} and identical top-1 wherever the oracle's top-2 "
                            f"margin exceeds {TOP1_TIE:g} of its largest |logit|")
        result.passed = all(s.cosine >= FP16_COSINE and (s.top1_agree or not s.top1_checked) for s in result.steps)


def _lora_feeds(model_proto, out_dir, model, lora_adapter) -> dict | None:
    """The adapter's A/B matrices under the folder's LoRA input names (reference/lora.py), or None."""
    if lora_adapter is None:
        return None
    from ..errors import RewriteError
    from .lora import adapter_feeds, lora_inputs

    if not model:
        raise RewriteError("--lora-adapter needs --model: the oracle is the model with the adapter merged")
    inputs = lora_inputs(model_proto)
    if not inputs:
        raise RewriteError(f"'{out_dir}' has no LoRA inputs; rewrite it with --lora")
    elem = next(i for i in model_proto.graph.input if i.name == "inputs_embeds").type.tensor_type.elem_type
    return adapter_feeds(lora_adapter, inputs, onnx.helper.tensor_dtype_to_np_dtype(elem))


def _int4_oracle(graph, out_dir, model, lora_adapter=None):
    """For a folder with INT4 GEMM nodes and an HF model: a second copy of the model holding the same
    dequantized weights the plugins should hold, computed from the model (features/int4.py); else None.
    A LoRA adapter is merged after the dequantized weights are in: the graph adds x·A·B to the INT4 GEMM."""
    if not model:
        return None
    cfg = Path(model) / "config.json"
    from ..hf.quantized_checkpoint import quantization

    if cfg.is_file() and quantization(json.loads(cfg.read_text())) is not None:
        return None  # an AWQ/GPTQ checkpoint: the oracle already holds its dequantized weights
    from ..features.int4 import OPS, int4_nodes, load_dequantized

    if not any(n.op_type in OPS.values() for n in graph.graph.node):
        return None
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer):
        onnx.load_external_data_for_model(graph, str(Path(out_dir)))  # the scales int4_nodes reads
    nodes = int4_nodes(graph)
    if not nodes:
        return None
    deq = HFOracle(model)
    pairs = load_dequantized(deq.model, nodes)
    log.info("INT4 weights loaded into: %s", ", ".join(name for _, name in pairs))
    if lora_adapter:
        from peft import PeftModel

        deq.model = PeftModel.from_pretrained(deq.model, str(lora_adapter)).merge_and_unload().eval()
    return deq
