"""verify: run a rewritten folder (prefill + greedy decode) and compare logits with an oracle.

The oracle is the HF model (`--model`) or the baseline ONNX it was rewritten from (`--baseline`, run
with onnxruntime). Each row's full sequence goes through the oracle on its own, so padding and caches
on the oracle side cannot hide an error on ours. Greedy tokens follow the oracle.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import onnx

from onnx_rewriter import progress
from onnx_rewriter.analysis.rope import model_rope_table
from onnx_rewriter.errors import RewriteError
from onnx_rewriter.features import wa_checkpoint
from onnx_rewriter.features.fp8_kv import graph_scales
from onnx_rewriter.features.int4 import OPS, int4_nodes, load_dequantized
from onnx_rewriter.features.moe import int4_moe_nodes, load_dequantized_experts
from onnx_rewriter.features.wa_quant import wa_linears
from onnx_rewriter.hf.export import load_model
from onnx_rewriter.hf.vlm import vlm_type
from onnx_rewriter.reference import moe as moe_reference
from onnx_rewriter.reference.lora import adapter_feeds, lora_inputs
from onnx_rewriter.reference.runner import Session, runner_for
from onnx_rewriter.verification import wa_baseline, wa_check
from onnx_rewriter.verification.checks import check_baseline, check_steps
from onnx_rewriter.verification.compare import FP8_COSINE, VerifyResult, compare, judge
from onnx_rewriter.verification.consistency import check_consistency
from onnx_rewriter.verification.eagle3 import is_eagle_folder, verify_eagle3
from onnx_rewriter.verification.fp8_oracle import Fp8Oracle
from onnx_rewriter.verification.moe_routing import RoutingFollower
from onnx_rewriter.verification.rope_check import check_rope
from onnx_rewriter.verification.vlm import verify_vlm

log = logging.getLogger(__name__)

class HFOracle:
    def __init__(self, model: str, lora_adapter: str | None = None, trust_remote_code: bool = False):
        self.model, self.config = load_model(model, trust_remote_code=trust_remote_code)
        if lora_adapter:  # transformers + PEFT, the adapter merged into the weights
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, str(lora_adapter)).merge_and_unload().eval()

    def __call__(self, seq: list[int]) -> np.ndarray:
        import torch

        with torch.no_grad():
            ids = torch.tensor([seq])
            return self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float().numpy()


class OnnxOracle:
    def __init__(self, path: str, qdq_fusions: bool = True):
        from pathlib import Path

        import onnxruntime as ort

        if not Path(path).is_file():
            raise RewriteError(f"baseline '{path}' does not exist; give the .onnx file the folder was rewritten from")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # ORT fuses int4 DequantizeLinear + MatMul into MatMulNBits computing with int8 activations by
        # default (2% off the graph's own math); the oracle must compute what the graph says.
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        if not qdq_fusions:  # W+A baselines: onnxruntime's Q/DQ rewrites (propagated through Transposes, fused
            # into integer MatMuls) give FP8 graphs it cannot run; unoptimized, it computes what the graph says
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.sess.get_inputs()]

    def __call__(self, seq: list[int]) -> np.ndarray:
        ids = np.asarray([seq], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                 "position_ids": np.arange(len(seq), dtype=np.int64)[None]}
        out = self.sess.run(None, {k: v for k, v in feeds.items() if k in self.names})[0]
        return np.asarray(out, dtype=np.float32)[0, -1]


def prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    """Two ragged prompts (batch-2, right-padded prefill)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, 11).tolist(), rng.integers(3, vocab, 6).tolist()]


def check_rope_tables(result: VerifyResult, out_dir, hf_config, rope) -> np.ndarray | None:
    """Fills result.rope_checks (verification/rope_check.py: each layer's table, as the runtime or the graph
    provides it, vs the model's over every position). Returns the model's table when `rope == "model"`
    asks to feed it instead of the runtime's."""
    try:
        result.rope_checks = check_rope(out_dir, hf_config)
        result.rope_table_difference = max((c.max_abs for c in result.rope_checks), default=None)
        return model_rope_table(hf_config, 512) if rope == "model" else None
    except (ValueError, KeyError, AttributeError) as exc:
        log.info("model RoPE table not computed: %s", exc)
        return None


def verify(out_dir, model: str | None = None, baseline: str | None = None, steps: int = 8, rope: str = "runtime",
           rows: list[list[int]] | None = None, quiet: bool = False, lora_adapter: str | None = None,
           fp16_model: str | None = None, trust_remote_code: bool = False, eagle_draft: str | None = None):
    """`fp16_model`: the unquantized model an AWQ/GPTQ checkpoint (`model`) was made from; the INT4 cost is
    reported against it. An EAGLE3 folder (base, or base/ + draft/ with `eagle_draft` the draft checkpoint)
    goes to verification/eagle3.py."""
    check_steps(steps)
    if is_eagle_folder(out_dir):
        if model is None:
            raise RewriteError("verify of an EAGLE3 folder needs --model (the base checkpoint)")
        return verify_eagle3(out_dir, model, eagle_draft, quiet=quiet)
    if eagle_draft is not None:
        raise RewriteError(f"--eagle-draft: '{out_dir}' is not an EAGLE3 folder")
    if model and vlm_type(model) and baseline is None and rows is None:  # image+text and text-only prompts
        return verify_vlm(out_dir, model, steps=steps, quiet=quiet)
    Session.check_folder(out_dir)  # before loading an oracle: a wrong folder fails fast
    if baseline is not None:
        check_baseline(baseline)
    inconsistent = check_consistency(out_dir, model, vlm=bool(vlm_type(model)) if model else None)
    if inconsistent is not None:
        return inconsistent
    # the graph once, without external weights: LoRA inputs, FP8 scales and INT4 nodes are read from it
    graph = onnx.load(str(Path(out_dir) / "model.onnx"), load_external_data=False)
    lora = _lora_feeds(graph, out_dir, model, lora_adapter)
    fp8_wa = wa_linears(graph, out_dir)  # W+A linears, FP8, INT8-SQ or NVFP4
    oracle, original = _oracles(graph, out_dir, model, baseline, lora_adapter, fp16_model, trust_remote_code,
                                fp8_wa)
    int4 = original is not None and not fp8_wa
    result = VerifyResult()
    wa_name = wa_check.described(fp8_wa)
    if fp8_wa:
        result.quantized = wa_name
    session = _session(result, out_dir, oracle, rope, lora)
    rows = rows or prompts(session.config["vocab_size"])
    follower = None
    if any(n.op_type in ("Int4MoePlugin", "Fp16MoePlugin") for n in graph.graph.node) and hasattr(oracle, "model"):
        oracle = follower = RoutingFollower(oracle, oracle.model)  # routing near-ties (moe_routing.py)
    fp8_scales = graph_scales(graph)
    if fp8_scales:  # the oracle rounds the cache as the runtime does; the FP8 cost is reported apart
        oracle, original = _fp8_oracles(oracle, original, fp8_scales, rows, model, trust_remote_code)
        result.quantized = ("INT4 + FP8 KV cache" if int4 else f"{wa_name} + FP8 KV cache" if fp8_wa
                            else "FP8 KV cache")
    moe_reference.EXPERTS_USED.clear()
    try:
        _run_steps(result, session, oracle, original, rows, steps, wa=bool(fp8_wa), follower=follower)
    finally:
        if follower is not None:
            follower.close()
    result.expert_usage = [(n, e, len(used)) for n, (e, used) in sorted(moe_reference.EXPERTS_USED.items())]
    _judge(result, session, fp8_kv_cost=bool(fp8_scales) and not int4)
    if follower is not None:
        result.routing_ties = follower.line()
        result.problems += list(follower.errors.values())
    result.problems += wa_check.check_kv_scales(fp8_scales, model)  # a checkpoint's own k/v scales, if any
    result.passed = result.passed and not result.problems
    if fp8_wa and model is None:  # rewritten from a Q/DQ baseline, its own oracle (verification/wa_baseline.py)
        result.problems += wa_baseline.check_linears(out_dir, baseline, fp8_wa)
        wa_baseline.judge(result)
    elif fp8_wa:  # the W+A rule (verification/wa_check.py)
        result.problems += wa_check.check_linears(out_dir, oracle.oracle.model if fp8_scales else oracle.model,
                                                  fp8_wa, checkpoint=model, original=original.model)
        wa_check.judge(result)
    if not quiet:
        print_result(result)
    return result


def _oracles(graph, out_dir, model, baseline, lora_adapter, fp16_model, trust_remote_code, wa: dict):
    """(the oracle our logits are compared with, the original model for a quantization cost or None). With INT4
    GEMMs the oracle holds the same dequantized weights and the model becomes the original; `fp16_model` is
    the original of an AWQ/GPTQ checkpoint; `wa` the folder's W+A linears (wa_linears)."""
    if wa:  # W+A: the model (its weights are the checkpoint's) with its linears' inputs fake-quantized
        oracle = HFOracle(model, lora_adapter, trust_remote_code) if model else None
        if not model:
            if baseline is not None and wa_baseline.carries_qdq(baseline):  # the Q/DQ input: it is the oracle
                both = wa_baseline.BaselineOracles(baseline, OnnxOracle)
                return both.oracle, both.original
            raise RewriteError("verify --baseline cannot simulate the folder's activation quantization (FP8 / "
                               "INT8-SQ / NVFP4) unless the baseline carries the same Q/DQ pairs; verify with "
                               "--model (the checkpoint)")
        return wa_check.twin(HFOracle(model, lora_adapter, trust_remote_code), wa, checkpoint=model), oracle
    oracle = HFOracle(model, lora_adapter, trust_remote_code) if model else OnnxOracle(baseline)
    dequantized = _int4_oracle(graph, out_dir, model, lora_adapter)
    if dequantized is not None:  # compare with the dequantized model; report the INT4 cost separately
        return dequantized, oracle
    if not fp16_model:
        return oracle, None
    if not any(n.op_type in OPS.values() for n in graph.graph.node):  # refused, not a meaningless "INT4 error"
        raise RewriteError(f"--fp16-model: '{out_dir}' has no INT4 linears, so there is no quantization error "
                           f"to report; verify it with --model alone")
    return oracle, HFOracle(fp16_model, trust_remote_code=trust_remote_code)


def _session(result: VerifyResult, out_dir, oracle, rope, lora) -> Session:
    """The rewritten folder on the reference, fed the runtime's RoPE table, the model's (`rope="model"`, or an
    explicit [P, R] table); fills result.rope_checks and result.reduced_vocab."""
    rope_table = None
    if isinstance(oracle, HFOracle):
        rope_table = check_rope_tables(result, out_dir, oracle.config, rope)
    if not isinstance(rope, str):  # an explicit [P, R] table (e.g. a model's own scaled frequencies)
        rope_table = np.asarray(rope, dtype=np.float32)
    session = Session(out_dir, rope_table=rope_table, lora=lora)
    if session.vocab_map is not None:
        result.reduced_vocab = (len(session.vocab_map), int(session.config["vocab_size"]))
    return session


def _fp8_oracles(oracle, original, fp8_scales, rows, model, trust_remote_code):
    """(the oracle rounding its KV cache as the folder's FP8 cache does, the original model it is costed
    against: the INT4 one's when there is one)."""
    if not isinstance(oracle, HFOracle):
        raise RewriteError("verify --baseline cannot simulate the folder's FP8 KV cache; verify with --model")
    if original is None:
        original = HFOracle(model, trust_remote_code=trust_remote_code)
    return Fp8Oracle(oracle, fp8_scales, rows), original


def _run_steps(result: VerifyResult, session: Session, oracle, original, rows, steps: int, wa: bool = False,
               follower: RoutingFollower | None = None) -> None:
    """Prefill `rows`, then `steps` greedy decode steps following the oracle's tokens; per step and row, our
    logits against the oracle's (result.steps) and the oracle's against the original's (result.quantization).
    With a reduced vocabulary our logits are the oracle's at the kept ids, and greedy picks among those.
    `follower` (MoE) is told after each call which tokens the reference just routed."""
    note = follower.collect if follower is not None else (lambda seqs, new: None)
    cut = (lambda x: x) if session.vocab_map is None else (lambda x: x[..., session.vocab_map])
    runner = runner_for(session, len(rows), capacity=max(map(len, rows)) + steps + 1)
    seqs = [list(r) for r in rows]
    pb = progress.bar(total=steps + 1, desc="verify")  # prefill + decode steps, on a terminal only
    ours = runner.prefill(seqs)
    note(seqs, [len(s) for s in seqs])
    for k in range(steps + 1):
        refs = cut(np.stack([oracle(s) for s in seqs]))
        pb.update()
        for b in range(len(seqs)):
            result.steps.append(compare(("prefill" if k == 0 else f"decode{k}") + f"/row{b}", ours[b], refs[b]))
            if original is not None:
                base = cut(original(seqs[b]))
                result.quantization.append(compare(result.steps[-1].step, refs[b], base))
                if wa:  # W+A: our own cost too (wa_check.judge compares the two costs)
                    result.ours_vs_original.append(compare(result.steps[-1].step, ours[b], base))
        if k == steps:
            break
        nxt = [session.token(r.argmax()) for r in refs]
        for s, t in zip(seqs, nxt):
            s.append(t)
        ours = runner.decode(nxt)
        note(seqs, [1] * len(seqs))
    pb.close()


def _judge(result: VerifyResult, session: Session, fp8_kv_cost: bool) -> None:
    """The pass rules (compare.judge), plus the FP8 KV cache cost and every layer's RoPE table."""
    judge(result, session.float)
    if fp8_kv_cost:
        result.criterion += f"; FP8 KV cache cost: cosine >= {FP8_COSINE} vs the model at every step"
        result.passed = result.passed and all(s.cosine >= FP8_COSINE for s in result.quantization)
    if any(not c.ok for c in result.rope_checks):  # logits of short prompts cannot show a long-context error
        result.passed = False
        result.criterion += "; every layer's RoPE table equals the model's up to max_position_embeddings"


def print_result(result: VerifyResult, out=None) -> None:
    """The step table, the RoPE checks, the quantization cost, the reduced vocabulary and the verdict."""
    out = out or sys.stdout
    print(result.table(), file=out)
    for check in result.rope_checks:
        print(check.line(), file=out)
    if result.quantization:
        print(result.quantization_line(), file=out)
    if result.ours_vs_original:
        print(wa_check.cost_line(result), file=out)
    for problem in result.problems:  # the W+A per-linear checks (wa_check.py)
        print(f"FAIL: {problem}", file=out)
    if result.routing_ties:
        print(result.routing_ties, file=out)
    if result.expert_usage:
        used = (f"{n.removeprefix('/model/').split('/')[0]} {k}/{e}" for n, e, k in result.expert_usage)
        print(f"MoE experts used over the run (of E, per plugin node): {', '.join(used)}", file=out)
    if result.reduced_vocab:
        print(f"reduced vocabulary: logits compared at the {result.reduced_vocab[0]} kept ids of "
              f"{result.reduced_vocab[1]}; greedy tokens mapped through vocab_map", file=out)
    print(f"verify {'PASSED' if result.passed else 'FAILED'} ({result.criterion})", file=out)


def _lora_feeds(model_proto, out_dir, model, lora_adapter) -> dict | None:
    """The adapter's A/B matrices under the folder's LoRA input names (reference/lora.py), or None."""
    if lora_adapter is None:
        return None

    if not model:
        raise RewriteError("--lora-adapter needs --model: the oracle is the model with the adapter merged")
    inputs = lora_inputs(model_proto)
    if not inputs:
        raise RewriteError(f"'{out_dir}' has no LoRA inputs; rewrite it with --lora")
    elem = next(i for i in model_proto.graph.input if i.name == "inputs_embeds").type.tensor_type.elem_type
    return adapter_feeds(lora_adapter, inputs, onnx.helper.tensor_dtype_to_np_dtype(elem))


def _int4_oracle(graph, out_dir, model, lora_adapter=None):
    """For a folder with INT4 GEMM nodes and an HF model: a second copy of the model holding the same
    dequantized weights the plugins should hold, computed from the model (features/int4/__init__.py); else None.
    A LoRA adapter is merged after the dequantized weights are in: the graph adds x·A·B to the INT4 GEMM."""
    if not model:
        return None
    fmt = wa_checkpoint.detect(model) if Path(model).is_dir() else None
    if fmt is not None and fmt.scheme != "block_fp8":
        return None  # an AWQ/GPTQ checkpoint: the oracle already holds its dequantized weights
    # (block-FP8 with --quantize int4: the INT4 plugins hold RTN codes of its dequantized fp16 weights, as below)

    if not any(n.op_type in (*OPS.values(), "Int4MoePlugin") for n in graph.graph.node):
        return None
    experts = int4_moe_nodes(graph)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer):
        onnx.load_external_data_for_model(graph, str(Path(out_dir)))  # the scales int4_nodes reads
    nodes = int4_nodes(graph)
    if not nodes and not experts:
        return None
    deq = HFOracle(model)
    pairs = load_dequantized(deq.model, nodes)
    moe = load_dequantized_experts(deq.model, experts)  # Int4MoePlugin: RTN of the model's own experts
    log.info("INT4 weights loaded into: %s", ", ".join([name for _, name in pairs] + moe))
    if lora_adapter:
        from peft import PeftModel

        deq.model = PeftModel.from_pretrained(deq.model, str(lora_adapter)).merge_and_unload().eval()
    return deq
