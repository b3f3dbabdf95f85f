"""``AttentionPlugin`` for ``onnx.reference.ReferenceEvaluator(model, new_ops=REFERENCE_OPS)``.

The evaluator keys custom ops by ``(op_domain, class __name__)``, so both classes below are
named ``AttentionPlugin`` and differ only in ``op_domain`` (``trt`` / ``trt_edgellm``).
Both dispatch on input count, since NVIDIA >= 0.8 writes ``trt_edgellm`` for the dense
runtimes too:

- 5: 0.5 target, packed qkv + the 4 dense inputs;
- 7: 0.9 target, q, k, v + the 4 dense inputs;
- 10: 0.11 paged form; 12 with the q/k-norm gammas at positions 6 and 7 (after
  ``kv_page_table``, before ``query_start_offsets``), as NVIDIA's schema orders them;
- 0.10 (batch-major paged; contract part 3 §17.2) is told apart by its attributes, not its count (6 or 8
  inputs, which 0.5's FP8 form also has): ``enable_qk_norm`` present and no ``plugin_version``; then
  qkv, pool, context_lengths, rope, kvcache_start_index, kv_page_table [, q gamma, k gamma].

With ``enable_fp8_kv_cache=1`` the cache is FLOAT8E4M3FN and the k/v scales come from the
``qkv_scales`` attribute ([q, k, v]; runtimes >= 0.7) or, on the 0.5 form, from one extra last
input ``k_v_scale_quant_orig`` fp32 [2] (6 inputs).

Weight+activation quantization (contract part 3, section 16; reference/qdq.py): ``QuantizeLinear`` and
``DequantizeLinear`` replace onnx's own (x / scale divided in fp32, FLOAT8E4M3FN / FLOAT4E2M1 / int8 inputs,
per-tensor, per-axis and blocked scales), and TensorRT's parser ops ``trt::TRT_FP4DynamicQuantize`` and
``trt::DequantizeLinear`` are added, and MXFP8's ``trt::TRT_MXFP8DynamicQuantize`` /
``trt::TRT_MXFP8DequantizeLinear``. NVFP4 weight-only: ``Nvfp4A16GemmPlugin`` (reference/nvfp4_a16.py).
"""

from __future__ import annotations

import weakref

import numpy as np
import onnx.defs

from . import qdq
from .int4 import int4_gemm
from .moe import fp16_moe_plugin, int4_moe_plugin, record_use
from .nvfp4_a16 import nvfp4_a16_gemm
from .nvfp4_a16 import weight as nvfp4_a16_weight
from .plugin import dense_attention, packed_qkv_dense_attention, paged_attention, paged_batch_attention
from .vit_attention import vit_attention

# Custom ops a rewritten graph may hold, per name; each is registered for both NVIDIA domains.
CUSTOM_OPS = ("AttentionPlugin", "Fp16MoePlugin", "Int4GroupwiseGemmPlugin", "Int4GroupwiseGemmPluginV2",
              "Int4MoePlugin", "Nvfp4A16GemmPlugin", "QkvConcatPlugin", "ViTAttentionPlugin", "DequantizeLinear",
              "TRT_FP4DynamicQuantize")


def _import_op_run():
    """Import ``onnx.reference.op_run`` whatever schemas are registered.

    On first import it builds a name -> schema map and raises NotImplementedError when one op
    name lives in two domains, which our plugin schemas registered for both ``trt`` and
    ``trt_edgellm`` are. Hide those schemas for the import, then put them back.
    """
    try:
        from onnx.reference import op_run
        return op_run
    except NotImplementedError:
        pass
    hidden = []
    for name in CUSTOM_OPS:
        for domain in ("trt", "trt_edgellm"):
            try:
                schema = onnx.defs.get_schema(name, domain)
            except onnx.defs.SchemaError:
                continue
            onnx.defs.deregister_schema(schema.name, schema.since_version, schema.domain)
            hidden.append(schema)
    try:
        from onnx.reference import op_run
    finally:
        for schema in hidden:
            onnx.defs.register_schema(schema)
    return op_run


OpRun = _import_op_run().OpRun


def _unsupported(**flags) -> None:
    on = [name for name, value in flags.items() if value]
    if on:
        raise NotImplementedError(f"AttentionPlugin reference does not model {', '.join(on)}")


def _kv_scales(inputs, attrs, scale_input: bool = True):
    """(inputs without a scale input, (k_scale, v_scale) or None) for the plugin's FP8 cache settings."""
    if not int(attrs.get("enable_fp8_kv_cache", 0)):
        return inputs, None
    if scale_input and len(inputs) in (6, 8):  # the 0.5 form: an extra last input [k_scale, v_scale]
        return inputs[:-1], np.asarray(inputs[-1], dtype=np.float32).reshape(-1)
    scales = attrs.get("qkv_scales")
    if scales is None or len(scales) != 3:
        raise ValueError(f"enable_fp8_kv_cache=1 needs qkv_scales with 3 entries (or the 0.5 scale input), "
                         f"got {scales}")
    if float(scales[0]) != 1.0:  # the q scale only feeds the FP8 FMHA path (SM 100+), not modelled here
        raise NotImplementedError(f"AttentionPlugin reference does not model q_scale {scales[0]} != 1")
    return inputs, np.asarray(scales[1:], dtype=np.float32)


def _dense(inputs, attrs, kv_scales=None):
    kwargs = dict(num_q_heads=int(attrs["num_q_heads"]), num_kv_heads=int(attrs["num_kv_heads"]),
                  head_size=int(attrs["head_size"]),
                  sliding_window_size=int(attrs.get("sliding_window_size", -1)),
                  attention_scale=attrs.get("attention_scale"), kv_scales=kv_scales)
    if int(attrs.get("enable_tree_attention", 0)):
        # the tree mask and positions follow the 4 (0.5) or 7 (0.9) plain inputs
        if len(inputs) not in (7, 9):
            raise ValueError(f"dense AttentionPlugin with tree attention takes 7 or 9 inputs, got {len(inputs)}")
        inputs, (kwargs["tree_mask"], kwargs["tree_pos"]) = inputs[:-2], inputs[-2:]
    if len(inputs) == 7:
        return dense_attention(*inputs, **kwargs)
    if len(inputs) == 5:
        return packed_qkv_dense_attention(*inputs, **kwargs)
    raise ValueError(f"dense AttentionPlugin takes 5 or 7 inputs, got {len(inputs)}")


def _paged(inputs, attrs, kv_scales=None):
    qk_norm = bool(attrs.get("enable_qk_norm", 0))
    tree = {}
    if int(attrs.get("enable_tree_attention", 0)):  # the mask and positions after the 6 (+2 gammas) first inputs
        at = 8 if qk_norm else 6
        if len(inputs) != at + 6:
            raise ValueError(f"0.11 tree AttentionPlugin: {len(inputs)} inputs with enable_qk_norm={int(qk_norm)} "
                             f"(expected {at + 6})")
        inputs = list(inputs)
        tree = {"tree_mask": inputs.pop(at), "tree_pos": inputs.pop(at)}
    if len(inputs) not in (10, 12) or qk_norm != (len(inputs) == 12):
        raise ValueError(f"paged AttentionPlugin: {len(inputs)} inputs with enable_qk_norm={int(qk_norm)} "
                         "(expected 10 without q/k-norm, 12 with it)")
    inputs = list(inputs)
    q_gamma = k_gamma = None
    if qk_norm:
        q_gamma, k_gamma = inputs.pop(6), inputs.pop(6)
    return paged_attention(
        *inputs, num_q_heads=int(attrs["num_q_heads"]), num_kv_heads=int(attrs["num_kv_heads"]),
        head_size=int(attrs["head_size"]), sliding_window_size=int(attrs.get("sliding_window_size", -1)),
        attention_scale=attrs.get("attention_scale"), q_norm_weight=q_gamma, k_norm_weight=k_gamma,
        rms_norm_eps=float(attrs.get("rms_norm_eps", 1e-6)),
        qk_norm_post_rope=bool(attrs.get("qk_norm_post_rope", 0)), kv_scales=kv_scales, **tree)


def _paged_batch(inputs, attrs, kv_scales=None):
    qk_norm = bool(attrs.get("enable_qk_norm", 0))
    tree = {}
    if int(attrs.get("enable_tree_attention", 0)):  # the tree group: after the q/k-norm gammas (§17.2)
        inputs = list(inputs)
        tree = {"tree_pos": inputs.pop(), "tree_mask": inputs.pop()}
    if len(inputs) != (8 if qk_norm else 6):
        raise ValueError(f"0.10 AttentionPlugin: {len(inputs)} inputs with enable_qk_norm={int(qk_norm)} "
                         "(expected 6 without q/k-norm, 8 with it)")
    q_gamma, k_gamma = inputs[6:8] if qk_norm else (None, None)
    return paged_batch_attention(
        *inputs[:6], num_q_heads=int(attrs["num_q_heads"]), num_kv_heads=int(attrs["num_kv_heads"]),
        head_size=int(attrs["head_size"]), sliding_window_size=int(attrs.get("sliding_window_size", -1)),
        attention_scale=attrs.get("attention_scale"), q_norm_weight=q_gamma, k_norm_weight=k_gamma,
        rms_norm_eps=float(attrs.get("rms_norm_eps", 1e-6)), kv_scales=kv_scales, **tree)


class _AttentionPluginBase(OpRun):
    # No schema lookup: attributes arrive only when present on the node; defaults live here.
    op_schema = None

    def _run(self, *inputs, **attrs):
        batch_paged = "enable_qk_norm" in attrs and "plugin_version" not in attrs  # the 0.10 form
        tree = int(attrs.get("enable_tree_attention", 0))
        _unsupported(enable_kv_shared=attrs.get("enable_kv_shared", 0),
                     enable_attention_sink=attrs.get("enable_attention_sink", 0),
                     enable_vision_block_attention=attrs.get("enable_vision_block_attention", 0),
                     enable_context_mask_selector=attrs.get("enable_context_mask_selector", 0))
        inputs, kv_scales = _kv_scales(list(inputs), attrs, scale_input=not batch_paged)
        if batch_paged:
            return _paged_batch(inputs, attrs, kv_scales)
        if len(inputs) in (5, 7) or (tree and len(inputs) == 9):
            return _dense(inputs, attrs, kv_scales)
        return _paged(inputs, attrs, kv_scales)


class TrtAttentionPlugin(_AttentionPluginBase):
    op_domain = "trt"


class TrtEdgeLLMAttentionPlugin(_AttentionPluginBase):
    op_domain = "trt_edgellm"


for _cls in (TrtAttentionPlugin, TrtEdgeLLMAttentionPlugin):
    _cls.__name__ = "AttentionPlugin"  # the evaluator matches on the class name

class _Int4Base(OpRun):
    op_schema = None
    version = 1

    def _run(self, x, qweight, scales, gemm_n=None, gemm_k=None, group_size=None):
        return (int4_gemm(x, qweight, scales, gemm_n=int(gemm_n), gemm_k=int(gemm_k), group_size=int(group_size),
                          version=self.version),)


class _Nvfp4A16Base(OpRun):
    """``Nvfp4A16GemmPlugin`` (reference/nvfp4_a16.py): fp16 x, Marlin E2M1 codes, E4M3 block scales, fp16 global."""
    op_schema = None

    def _run(self, x, qweights, block_scales, global_scale, gemm_n=None, gemm_k=None, max_m=None):
        attrs = {"gemm_n": int(gemm_n), "gemm_k": int(gemm_k), "max_m": int(max_m)}
        return (nvfp4_a16_gemm(x, qweights, block_scales, global_scale, **attrs,
                               w=self._weight(attrs, qweights, block_scales, global_scale)),)

    def _weight(self, attrs, *inputs):
        """The unpacked fp32 weight, kept on the node (under MatMul's budget) while its read-only inputs are the
        same arrays: unpacking a 0.5B MLP weight each call took 0.25 s."""
        key = tuple((a if a.base is None else a.base, a.ctypes.data, a.shape) for a in inputs)
        held = getattr(self, "_held", None)
        if held is not None and all(h[0] is k[0] and h[1:] == k[1:] for h, k in zip(held[0], key)):
            return held[1]
        w = nvfp4_a16_weight(*inputs, **attrs)
        if (held is None and not any(a.flags.writeable for a in inputs)
                and MatMul._cached[0] + w.nbytes <= MatMul.CACHE_BYTES):
            self._held = (key, w)
            MatMul._cached[0] += w.nbytes
            weakref.finalize(self, MatMul._release, w.nbytes)
        return w


class _Fp16MoeBase(OpRun):
    """``Fp16MoePlugin`` (reference/moe.py): router logits, hidden states, fc1 [E, 2I, H], fc2 [E, H, I]."""
    op_schema = None

    def _run(self, *inputs, **attrs):
        record_use(self.onnx_node.name, inputs[0], int(attrs["top_k"]))
        return (fp16_moe_plugin(*inputs, **{k: v for k, v in attrs.items() if v is not None}),)


class _Int4MoeBase(OpRun):
    """``Int4MoePlugin`` (reference/moe.py): router logits, hidden states, Marlin FC1 / FC2 bytes and scales."""
    op_schema = None

    def _run(self, *inputs, **attrs):
        if len(inputs) != 6:
            raise ValueError(f"Int4MoePlugin takes 6 inputs, got {len(inputs)}")
        record_use(self.onnx_node.name, inputs[0], int(attrs["top_k"]))
        return (int4_moe_plugin(*inputs, **{k: v for k, v in attrs.items() if v is not None}),)


class _QkvConcatBase(OpRun):
    op_schema = None

    def _run(self, q, k, v):
        return (np.concatenate([q, k, v], axis=-1),)


class _ViTAttentionBase(OpRun):
    op_schema = None

    def _run(self, q, k, v, cu_seqlens, max_seqlen_carrier, num_heads=None, head_size=None, attention_scale=None,
             qkv_scales=None):
        if qkv_scales is not None and list(qkv_scales) != [1.0, 1.0, 1.0]:
            raise NotImplementedError("ViTAttentionPlugin reference does not model FP8 qkv_scales")
        return (vit_attention(q, k, v, cu_seqlens, max_seqlen_carrier, num_heads=int(num_heads),
                              head_size=int(head_size), attention_scale=attention_scale),)


class Sigmoid(OpRun):
    """onnx.reference's Sigmoid, without its warnings: its np.where evaluates both branches, and the one it
    discards overflows for |x| > 88 (a SiLU in every MLP of a real model). Same numbers."""
    op_domain = ""
    op_schema = None

    def _run(self, x):
        from onnx.reference.ops.op_sigmoid import sigmoid

        with np.errstate(over="ignore", invalid="ignore"):
            return (sigmoid(x).astype(x.dtype),)


class MatMul(OpRun):
    """onnx.reference's MatMul, with fp16/bf16 operands multiplied as fp32 by BLAS and the result rounded once:
    what a GPU GEMM with fp32 accumulation returns. numpy's own fp16 matmul also accumulates in fp32 (its
    results differ in ~0.2% of elements by one fp16 ulp, from the summation order) but runs without BLAS,
    ~100x slower: a 61-token call of a 30-layer 135M model took 36 s, 98% of it here (4 s now).

    The fp32 copy of a weight (the same array object every run) is kept on the node while all kept copies
    stay under CACHE_BYTES: casting it again each call cost as much as the product itself."""
    op_domain = ""
    op_schema = None
    _NARROW = ("float16", "bfloat16")
    CACHE_BYTES = 2 << 30
    _cached = [0]  # bytes of the fp32 copies held by live nodes

    def _run(self, a, b):
        if a.dtype.name not in self._NARROW or b.dtype != a.dtype:
            from onnx.reference.ops.op_matmul import numpy_matmul

            return (numpy_matmul(a, b),)
        return (np.matmul(a.astype(np.float32), self._wide(b)).astype(a.dtype),)

    def _wide(self, b):
        """b as fp32; kept when b is read-only (an initializer, or the view of one: a tied lm_head arrives as a
        new Transpose view of the same table each run), keyed on the memory it views."""
        if b.flags.writeable:  # an activation or a feed that may change in place: never kept
            return b.astype(np.float32)
        key = (b if b.base is None else b.base, b.ctypes.data, b.shape, b.strides)
        held = getattr(self, "_held", None)
        if held is not None and held[0][0] is key[0] and held[0][1:] == key[1:]:
            return held[1]
        wide = b.astype(np.float32)
        if held is None and self._cached[0] + wide.nbytes <= self.CACHE_BYTES:
            self._held = (key, wide)
            self._cached[0] += wide.nbytes
            weakref.finalize(self, self._release, wide.nbytes)
        return wide

    @classmethod
    def _release(cls, nbytes: int) -> None:
        cls._cached[0] -= nbytes


class QuantizeLinear(OpRun):
    """ONNX QuantizeLinear as the runtime computes it (reference/qdq.py: x / scale in fp32, E4M3 saturating)."""
    op_domain = ""
    op_schema = None

    def _run(self, x, scale, zero_point=None, axis=1, block_size=0, output_dtype=0, saturate=1, precision=0):
        return (qdq.quantize_linear(x, scale, zero_point, axis=int(axis), block_size=int(block_size),
                                    output_dtype=int(output_dtype), saturate=int(saturate)),)


class _DequantizeBase(OpRun):
    op_schema = None

    def _run(self, x, scale, zero_point=None, axis=1, block_size=0, output_dtype=0):
        y = qdq.dequantize_linear(x, scale, zero_point, axis=int(axis), block_size=int(block_size))
        if output_dtype:
            y = y.astype(onnx.helper.tensor_dtype_to_np_dtype(int(output_dtype)))
        return (y,)


class DequantizeLinear(_DequantizeBase):
    """ONNX DequantizeLinear: FLOAT8E4M3FN / FLOAT4E2M1 / integer inputs, per tensor, axis or block."""
    op_domain = ""


class TrtDequantizeLinear(_DequantizeBase):
    """trt::DequantizeLinear (TensorRT's parser op; the same semantics, FP4 blocks included)."""
    op_domain = "trt"


TrtDequantizeLinear.__name__ = "DequantizeLinear"


class TRT_FP4DynamicQuantize(OpRun):  # noqa: N801 (the op's name)
    op_domain = "trt"
    op_schema = None

    def _run(self, x, scale, axis=-1, block_size=16, scale_type=17):
        return qdq.fp4_dynamic_quantize(x, scale, axis=int(axis), block_size=int(block_size),
                                        scale_type=int(scale_type))


class TRT_MXFP8DynamicQuantize(OpRun):  # noqa: N801 (the op's name)
    op_domain = "trt"
    op_schema = None

    def _run(self, x, axis=-1, block_size=32, output_dtype=17):
        return qdq.mxfp8_dynamic_quantize(x, axis=int(axis), block_size=int(block_size),
                                          output_dtype=int(output_dtype))


class TRT_MXFP8DequantizeLinear(OpRun):  # noqa: N801 (the op's name)
    op_domain = "trt"
    op_schema = None

    def _run(self, x, scale, axis=-1, block_size=32, output_dtype=10):
        return (qdq.mxfp8_dequantize_linear(x, scale, axis=int(axis), block_size=int(block_size),
                                            output_dtype=int(output_dtype)),)


def _per_domain(base, name: str, **fields) -> list:
    classes = []
    for domain in ("trt", "trt_edgellm"):
        cls = type(name, (base,), {"op_domain": domain, **fields})
        classes.append(cls)
    return classes


REFERENCE_OPS = ([TrtAttentionPlugin, TrtEdgeLLMAttentionPlugin]
                 + _per_domain(_Int4Base, "Int4GroupwiseGemmPlugin", version=1)
                 + _per_domain(_Int4Base, "Int4GroupwiseGemmPluginV2", version=2)
                 + _per_domain(_QkvConcatBase, "QkvConcatPlugin")
                 + _per_domain(_Nvfp4A16Base, "Nvfp4A16GemmPlugin")
                 + _per_domain(_Fp16MoeBase, "Fp16MoePlugin") + _per_domain(_Int4MoeBase, "Int4MoePlugin")
                 + _per_domain(_ViTAttentionBase, "ViTAttentionPlugin") + [Sigmoid, MatMul]
                 + [QuantizeLinear, DequantizeLinear, TrtDequantizeLinear, TRT_FP4DynamicQuantize]
                 + [TRT_MXFP8DynamicQuantize, TRT_MXFP8DequantizeLinear])


def reference_evaluator(model, **kwargs):
    """``ReferenceEvaluator`` over ``model`` with the plugin ops (safe after schema registration)."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model, new_ops=REFERENCE_OPS + list(kwargs.pop("new_ops", [])), **kwargs)
