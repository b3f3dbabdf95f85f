"""Can the suite fail? Deliberate bugs in the rewriter, one at a time: each one's own fast tests must fail.

Each mutant is exact text replaced in a copy of the repository (tracked and untracked, not ignored,
files) and names the few default-suite tests (no slow ones) that must catch it: its documented subset,
chosen so a run stays well under a minute. The copy runs them with PYTHONPATH pointing at it. The
unmutated copy first runs the union of all lists once and must pass, so a mutant's failures are its own.
Exports do not depend on the rewriter: they are built once and shared by every run
(ONNX_REWRITER_TEST_MODELS).

    python tests/mutants.py [--only WORD ...] [--write docs/mutants.md]      (make mutants)

Exit code 0 when every mutant is caught, 1 when one survives (or the control run fails).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutant:
    name: str
    path: str  # relative to the repository root
    edits: list  # (exact old text, new text); each old text must occur exactly once
    tests: list  # pytest ids of the default suite that must fail on it (its documented subset)


C = "tests/test_feature_contracts.py::"  # the contract tests written for these bug classes (issue 26)

MUTANTS = [
    # ---------------------------------------------------------------- probe, targets (issue 18)
    Mutant("mask probe always answers causal", "onnx_rewriter/analysis/mask_probe.py", [
        ("        if np.array_equal(allowed, causal) or (0 < w < s and",
         "        if True or (0 < w < s and"),
        ("            w = None if np.array_equal(allowed, causal) else w", "            w = None")],
        ["tests/test_mask_probe.py::test_causal_and_windows_are_read"]),
    Mutant("baked RoPE table halves swapped (sin before cos)", "onnx_rewriter/targets/base.py", [
        ("    table = np.concatenate([np.cos(f), np.sin(f)], axis=-1)",
         "    table = np.concatenate([np.sin(f), np.cos(f)], axis=-1)")],
        [C + "test_yarn_table_carries_attention_scaling_and_verifies"]),
    Mutant("sliding window off by one", "onnx_rewriter/targets/base.py", [
        ('"sliding_window_size": layer.sliding_window if layer.sliding_window else -1,',
         '"sliding_window_size": layer.sliding_window + 1 if layer.sliding_window else -1,')],
        ["tests/test_verify.py::test_dropped_window_fails_verify"]),
    Mutant("non-default scale dropped (dense: q not pre-scaled)", "onnx_rewriter/targets/base.py", [
        ("    factor = layer.scale / layer.default_scale", "    factor = 1.0")],
        ["tests/test_coverage.py::test_rewritten_and_verified[gemma3-float32]"]),
    Mutant("non-default scale dropped (paged: default attention_scale)", "onnx_rewriter/targets/edgellm_011.py", [
        ('"attention_scale": float(layer.scale),', '"attention_scale": float(layer.default_scale),')],
        ["tests/targets/test_targets.py::test_paged_non_default_scale_is_the_attribute"]),
    Mutant("edgellm-0.10 q and k norm gammas swapped", "onnx_rewriter/targets/edgellm_010.py", [
        ('for w, n in zip("qk", norms or ())]', 'for w, n in zip("qk", (norms or ())[::-1])]')],
        ["tests/targets/test_targets.py::test_verify[qwen3-edgellm-0.10-float32]"]),
    Mutant("edgellm-0.10 pool: every token written to the row's first page", "onnx_rewriter/reference/plugin.py", [
        ("        pages = self.table[b, which][positions // PAGE_SIZE]",
         "        pages = self.table[b, which][positions * 0]")],
        ["tests/reference/test_plugin.py::test_paged_batch_matches_dense[gqa2]"]),
    Mutant("k and v swapped at the plugin", "onnx_rewriter/targets/edgellm_09.py", [
        ("        return [q, k, v]", "        return [q, v, k]")],
        ["tests/test_coverage.py::test_rewritten_and_verified[llama-float32]"]),
    Mutant("edgellm-0.5 fed q, k, v apart instead of one packed qkv", "onnx_rewriter/targets/edgellm_05.py", [
        ("    packed_qkv = True", "    packed_qkv = False")],
        ["tests/test_fp8_kv.py::test_fp8_kv_verifies[qwen2-edgellm-0.5]"]),
    # ---------------------------------------------------------------- INT4 (int4_layout, int4, int4_awq, quantized_onnx)  # noqa: E501
    Mutant("INT4 V1 nibble order flipped in the packer", "onnx_rewriter/features/int4/layout.py", [
        ("    words = tuples[..., 0] | tuples[..., 1] << 4 |", "    words = tuples[..., 1] | tuples[..., 0] << 4 |")],
        ["tests/reference/test_int4.py"]),
    Mutant("INT4 V1 column permutation inside a 32-wide block transposed", "onnx_rewriter/reference/int4.py", [
        ("_P = np.array([8 * (i % 4) + i // 4 for i in range(32)]", "_P = np.array([4 * (i % 8) + i // 8 for i in range(32)]")],  # noqa: E501
        ["tests/reference/test_int4.py"]),
    Mutant("INT4 dequantized with zero point 7 instead of 8", "onnx_rewriter/reference/int4.py", [
        ("    return ((u.astype(np.float32) - 8.0) * per_k).astype(np.float16)",
         "    return ((u.astype(np.float32) - 7.0) * per_k).astype(np.float16)")],
        [C + "test_int4_rtn_codes_dequantize_to_the_weights_within_half_a_step"]),
    Mutant("INT4 plugin's gemm_n and gemm_k attributes swapped", "onnx_rewriter/features/int4/__init__.py", [
        ('attrs={"gemm_n": n, "gemm_k": k, "group_size": G})', 'attrs={"gemm_n": k, "gemm_k": n, "group_size": G})')],
        [C + "test_int4_lora_slots_have_the_linears_dims_and_an_adapter_verifies"]),
    Mutant("AWQ pre_quant_scale is s instead of 1 / s", "onnx_rewriter/features/int4/__init__.py", [
        ("(1.0 / s).astype(np.float16))", "(s).astype(np.float16))")],
        ["tests/test_int4_awq.py::test_awq_verifies_and_beats_rtn_on_held_out_prompts"]),
    Mutant("AWQ weights divided by s instead of multiplied", "onnx_rewriter/features/int4/awq.py", [
        ("    return (np.asarray(w_kn, np.float16).astype(np.float32) * s[:, None]).astype(np.float16)",
         "    return (np.asarray(w_kn, np.float16).astype(np.float32) / s[:, None]).astype(np.float16)")],
        ["tests/test_int4_awq.py::test_search_trials_hold_exactly_the_quantized_weights"]),
    Mutant("MatMulNBits nibbles read high first", "onnx_rewriter/features/int4/onnx_in.py", [
        ("    return np.stack([b & 0xF, b >> 4], axis=-1)", "    return np.stack([b >> 4, b & 0xF], axis=-1)")],
        ["tests/test_int4_onnx.py::test_quantized_onnx_converts_and_verifies"]),
    Mutant("MatMulNBits default zero point 0 instead of 8", "onnx_rewriter/features/int4/onnx_in.py", [
        ("        z = np.full((n, blocks), 8, dtype=np.int16)", "        z = np.full((n, blocks), 0, dtype=np.int16)")],
        ["tests/test_int4_onnx.py::test_quantized_onnx_converts_and_verifies"]),
    # ---------------------------------------------------------------- FP8 KV cache (fp8_kv, calibration)
    Mutant("FP8 k scale computed before RoPE", "onnx_rewriter/features/calibration.py", [
        ("                x = apply_rope(x.transpose(0, 2, 1, 3), layer_rope_table(run.layers[i], len(rows[p])))",
         "                x = x.transpose(0, 2, 1, 3)")],
        [C + "test_fp8_kv_scales_are_amax_of_roped_k_and_of_v_over_448"]),
    Mutant("FP8 scales amax / 224 instead of amax / 448", "onnx_rewriter/features/calibration.py", [
        ("amax / fp8.E4M3_MAX, 1.0)", "amax / (fp8.E4M3_MAX / 2), 1.0)")],
        [C + "test_fp8_kv_scales_are_amax_of_roped_k_and_of_v_over_448"]),
    Mutant("calibration: a streamed MatMul keeps only its last block's product",
           "onnx_rewriter/features/calibration.py", [
        ("                    y[..., c:c + cols] += part", "                    y[..., c:c + cols] = part")],
        ["tests/test_calibration.py::test_lean_runs_stream_big_matmuls_in_groups_of_prompts"]),
    Mutant("W+A calibrated INT8 codes: each row block scaled by the first block's row scales",
           "onnx_rewriter/features/wa_calibrate.py", [
        ('weight_scale=small["weight_scale"][n0 + r0:n0 + r1]', 'weight_scale=small["weight_scale"][r0:r1]')],
        ["tests/test_wa_calibrate.py::test_codes_streamed_in_row_blocks_equal_the_whole_linear"]),
    Mutant("FP8 qkv_scales attribute [1, v, k]", "onnx_rewriter/features/fp8_kv.py", [
        ('                node.attrs["qkv_scales"] = [1.0, k, v]', '                node.attrs["qkv_scales"] = [1.0, v, k]')],  # noqa: E501
        ["tests/test_fp8_kv.py::test_fp8_kv_verifies[llama-edgellm-0.11]"]),
    Mutant("FP8 edgellm-0.5 scale input [v, k]", "onnx_rewriter/features/fp8_kv.py", [
        ("np.array([k, v], np.float32)", "np.array([v, k], np.float32)")],
        ["tests/test_fp8_kv.py::test_fp8_kv_verifies[qwen2-edgellm-0.5]"]),
    Mutant("FP8 checkpoint k_scale and v_scale read swapped", "onnx_rewriter/features/fp8_kv.py", [
        ("                    found[(int(m.group(1)), m.group(2)[0])] =",
         "                    found[(int(m.group(1)), \"kv\"[m.group(2)[0] == \"k\"])] =")],
        ["tests/test_fp8_kv.py::test_modelopt_scales_taken_as_stored"]),
    # ---------------------------------------------------------------- W+A quantization codecs (reference/wa_codecs)
    Mutant("FP4 nibble order swapped (even k in the high nibble)", "onnx_rewriter/reference/wa_codecs.py", [
        ("    return (c[..., 0::2] & 0xF) | ((c[..., 1::2] & 0xF) << 4)",
         "    return (c[..., 1::2] & 0xF) | ((c[..., 0::2] & 0xF) << 4)")],
        ["tests/reference/test_wa_codecs.py::test_seeded_nvfp4_matrix_sha256"]),
    Mutant("NVFP4 block scale applied to the wrong block of 16", "onnx_rewriter/reference/wa_codecs.py", [
        ("    return e2m1_decode(codes) * np.repeat(step, FP4_BLOCK, axis=-1)",
         "    return e2m1_decode(codes) * np.tile(step, FP4_BLOCK)")],
        ["tests/reference/test_wa_codecs.py::test_nvfp4_dequantize_uses_each_blocks_own_scale"]),
    Mutant("E4M3 rounds ties away from zero", "onnx_rewriter/reference/wa_codecs.py", [
        ("        m = np.rint(a / quantum) * quantum", "        m = np.floor(a / quantum + 0.5) * quantum")],
        ["tests/reference/test_wa_codecs.py::test_e4m3_encode_matches_torch_round_to_nearest_even"]),
    Mutant("block-FP8 scale_inv read for the mirrored 128-block", "onnx_rewriter/features/wa_checkpoint.py", [
        ('            inv = t["weight_scale_inv"].astype(f64)\n', '            inv = t["weight_scale_inv"].astype(f64)[::-1, ::-1]\n')],  # noqa: E501
        ["tests/test_wa_checkpoint.py::test_block_fp8_reads_the_scale_of_each_128_block"]),
    Mutant("export reads any W+A checkpoint (refusal bypassed)", "onnx_rewriter/hf/trace.py", [
        ("    fmt.refuse_unless(EXPORTED_QUANT, ", "    fmt.refuse_unless(tuple(wa_checkpoint.SCHEME_NAMES), ")],
        ["tests/test_wa_checkpoint.py::test_export_route_refuses_by_name"]),
    Mutant("NVFP4 checkpoint weight read as [N/2, K] like ModelOpt INT4", "onnx_rewriter/hf/checkpoint_check.py", [
        ('        if dtypes[f"{name}_scale"] == "F8_E4M3":', '        if False:')],
        ["tests/test_wa_checkpoint.py::test_checkpoint_check_reads_nvfp4_shapes"]),
    Mutant("DequantizeLinear block scale tiled over the wrong blocks", "onnx_rewriter/reference/qdq.py", [
        ("        return np.repeat(s, block_size, axis=axis)[tuple(slice(0, n) for n in shape)]",
         "        return np.tile(s, [block_size if d == axis else 1 for d in range(rank)])[tuple(slice(0, n) for n in shape)]")],  # noqa: E501
        ["tests/reference/test_qdq.py::test_nvfp4_weight_bytes_verbatim_dequantize_per_block"]),
    Mutant("QuantizeLinear divides in fp16 (rounds twice)", "onnx_rewriter/reference/qdq.py", [
        ("    y = x.astype(np.float32) / s  # fp32 division", "    y = (x / s.astype(x.dtype)).astype(np.float32)  #")],
        ["tests/reference/test_qdq.py::test_fp8_quantize_rounds_once_from_the_fp32_quotient"]),
    # ------------------------------------------------- W+A formats: MIXED_PRECISION, W4A16_NVFP4, checkpoint FP8 KV
    Mutant("W4A16_NVFP4 linear given an NVFP4 activation quantizer (weight_scale_2 as input scale)", "onnx_rewriter/features/wa_quant.py", [  # noqa: E501
        ('            node.inputs[1] = self._nvfp4_weight(g, node.name.removesuffix("/MatMul"), module, lin, s_g)',
         "            self._emit_nvfp4(g, node, module, lin, s_g, s_g, chains)")],
        ["tests/test_wa_formats.py::test_mixed_on_09_verifies_each_linear_in_its_scheme"]),
    Mutant("NVFP4-A16 block scales packed in 15.4's fp16 Marlin scale order", "onnx_rewriter/features/nvfp4_a16.py", [
        ("    place = m - m % 64 + 8 * (m % 8) + ((r & 4) | ((r & 1) << 1) | ((r >> 1) & 1))",
         "    place = m - m % 64 + 8 * (m % 8) + r")],
        ["tests/test_nvfp4_a16.py::test_export_011_emits_the_plugin_and_verifies"]),
    Mutant("NVFP4-A16 reference plugin drops the global scale's 2^7", "onnx_rewriter/reference/nvfp4_a16.py", [
        ("GLOBAL_SCALE_SHIFT = 2.0 ** 7", "GLOBAL_SCALE_SHIFT = 1.0")],
        ["tests/test_nvfp4_a16.py::test_export_011_emits_the_plugin_and_verifies"]),
    Mutant("MXFP8 E8M0 scale read with bias 128 (every block halved)", "onnx_rewriter/reference/wa_codecs.py", [
        ("    step = np.where(s == 255, np.nan, np.exp2(s - 127))",
         "    step = np.where(s == 255, np.nan, np.exp2(s - 128))")],
        ["tests/test_wa_formats.py::test_mixed_on_09_verifies_each_linear_in_its_scheme"]),
    Mutant("checkpoint k/v scales swapped into the FP8 KV cache", "onnx_rewriter/features/fp8_kv.py", [
        ('    scales = [(found[(i, "k")], found[(i, "v")]) for i in range(num_layers)]',
         '    scales = [(found[(i, "v")], found[(i, "k")]) for i in range(num_layers)]')],
        ["tests/test_wa_formats.py::test_mixed_on_09_verifies_each_linear_in_its_scheme"]),
    # ---------------------------------------------------------------- FP8 W8A8 (wa_quant, verification/wa_check)
    Mutant("FP8 weight scale taken from input_scale", "onnx_rewriter/features/wa_quant.py", [
        ('            s_w = np.float16(lin.tensors["weight_scale"].reshape(()))',
         '            s_w = np.float16(lin.tensors["input_scale"].reshape(()))')],
        ["tests/test_wa_quant.py::test_fp8_export_verifies"]),
    Mutant("FP8 input scale taken from weight_scale", "onnx_rewriter/features/wa_quant.py", [
        ('            s_in = np.float16(lin.tensors["input_scale"].reshape(()))',
         '            s_in = np.float16(lin.tensors["weight_scale"].reshape(()))')],
        ["tests/test_wa_quant.py::test_fp8_export_verifies"]),
    Mutant("FP8 QuantizeLinear below opset 21 without its FLOAT8 zero point (uint8 output)", "onnx_rewriter/features/wa_quant.py", [  # noqa: E501
        ('                q_in, attrs = [x, scale, gs.Constant(f"{base}/input_zero_point", np.zeros((), E4M3))], {}',
         "                q_in, attrs = [x, scale], {}")],
        ["tests/test_wa_quant.py::test_fp8_export_verifies"]),
    Mutant("FP8 verify cost rule 100x looser", "onnx_rewriter/verification/wa_check.py", [
        ("COST_RATIO = 2.0", "COST_RATIO = 200.0")],
        ["tests/test_wa_quant.py::test_miswired_linear_fails_verify_on_its_cost"]),
    Mutant("INT8-SQ pre_quant_scale Mul dropped", "onnx_rewriter/features/wa_quant.py", [
        ("            if pqs is not None:\n                xs = _var(",
         "            if False:\n                xs = _var(")],
        ["tests/test_wa_quant.py::test_int8_sq_export_verifies_and_holds_the_checkpoint"]),
    Mutant("INT8-SQ weight scales on the input axis", "onnx_rewriter/features/wa_quant.py", [
        ('                  {"axis": 0})', '                  {"axis": 1})')],
        ["tests/test_wa_quant.py::test_int8_sq_export_verifies_and_holds_the_checkpoint"]),
    Mutant("NVFP4 graph block scales reversed along K (each 16-block reads another's)", "onnx_rewriter/features/wa_quant.py", [  # noqa: E501
        ('                                  lambda: as_e4m3(ck.linear(module).tensors["weight_scale"]))',
         '                                  lambda: as_e4m3(ck.linear(module).tensors["weight_scale"][:, ::-1].copy()))')],  # noqa: E501
        ["tests/test_wa_quant.py::test_nvfp4_export_verifies"]),
    Mutant("NVFP4 graph weight nibbles swapped (even k in the high nibble)", "onnx_rewriter/features/wa_quant.py", [
        ('E2M1, (n, k), lambda: ck.linear(module).tensors["weight"])',
         'E2M1, (n, k), lambda: (lambda w: (w << 4) | (w >> 4))(ck.linear(module).tensors["weight"]))')],
        ["tests/test_wa_quant.py::test_nvfp4_export_verifies"]),
    Mutant("NVFP4 activation scale dequantized without its fp16 Cast (fp32 scale)", "onnx_rewriter/features/wa_quant.py", [  # noqa: E501
        ('[sx, s16],', '[sx, scale],')],
        ["tests/test_wa_quant.py::test_nvfp4_export_verifies"]),
    # ---------------------------------------------------------------- W+A from an fp16 model (wa_calibrate)
    Mutant("SmoothQuant scale applied to the weight, not divided from the activation", "onnx_rewriter/features/wa_calibrate.py", [  # noqa: E501
        ('                small["pre_quant_scale"] = pqs', '                pass')],
        ["tests/test_wa_calibrate.py::test_calibrated_folder_verifies[int8-sq-edgellm-0.10]"]),
    Mutant("calibrated FP8 input scale 4x too small (activations saturate)", "onnx_rewriter/features/wa_calibrate.py", [  # noqa: E501
        ("        return np.array(_fp16_ceil(a / C.E4M3_MAX), np.float32)",
         "        return np.array(_fp16_ceil(a / C.E4M3_MAX / 4), np.float32)")],
        ["tests/test_wa_calibrate.py::test_input_scales_are_the_calibrated_amax"]),
    Mutant("SmoothQuant weight multiplied by pre_quant_scale instead of divided", "onnx_rewriter/features/wa_calibrate.py", [  # noqa: E501
        ("        w = w / pqs.astype(np.float64)[None, :]\n    return {\"weight\": C.int8_quantize(",
         "        w = w * pqs.astype(np.float64)[None, :]\n    return {\"weight\": C.int8_quantize(")],
        ["tests/test_wa_calibrate.py::test_calibrated_folder_verifies[int8-sq-edgellm-0.10]"]),
    # ---------------------------------------------------------------- reduced vocabulary
    Mutant("reduced vocab accepts an EOS id equal to V", "onnx_rewriter/features/reduced_vocab.py", [
        ("if not 0 <= i < vocab)", "if not 0 <= i <= vocab)")],
        [C + "test_select_takes_v_minus_one_and_refuses_v"]),
    Mutant("reduced vocab cuts a Gemm lm_head on the wrong axis", "onnx_rewriter/features/reduced_vocab.py", [
        ('            axis = 0 if node.attrs.get("transB", 0) else 1', '            axis = 1 if node.attrs.get("transB", 0) else 0')],  # noqa: E501
        [C + "test_gemm_lm_head_keeps_the_rows_of_the_kept_tokens"]),
    Mutant("reduced vocab ignores generation_config.json's EOS ids", "onnx_rewriter/features/reduced_vocab.py", [
        ('        for name in ("config.json", "generation_config.json"):', '        for name in ("config.json",):')],
        ["tests/test_reduced_vocab.py::test_selection_is_exactly_specials_eos_and_the_list"]),
    Mutant("reduced vocab pads one short of --vocab-multiple", "onnx_rewriter/features/reduced_vocab.py", [
        ("range(min(multiple - len(kept) % multiple, vocab - len(kept)))",
         "range(min(multiple - len(kept) % multiple - 1, vocab - len(kept)))")],
        ["tests/test_reduced_vocab.py::test_selection_is_exactly_specials_eos_and_the_list"]),
    # ---------------------------------------------------------------- LoRA
    Mutant("LoRA slot of an INT4 plugin with K and N swapped", "onnx_rewriter/features/lora.py", [
        ('return x, int(node.attrs["gemm_k"]), int(node.attrs["gemm_n"])',
         'return x, int(node.attrs["gemm_n"]), int(node.attrs["gemm_k"])')],
        [C + "test_int4_lora_slots_have_the_linears_dims_and_an_adapter_verifies"]),
    Mutant("LoRA A reads the AWQ-scaled input", "onnx_rewriter/features/lora.py", [
        ('("Mul", "pre_quant_scale_mul")):', '("Mul", "no_such_node")):')],
        ["tests/test_int4_awq.py::test_lora_reads_the_unscaled_input"]),
    Mutant("LoRA delta added but its readers keep the base GEMM's output", "onnx_rewriter/features/lora.py", [
        ("        replace_uses(g, y, out)  # before the Add exists: it alone keeps reading y", "        pass")],
        ["tests/test_lora.py::test_lora_inputs_and_adapter_verify[edgellm-0.9]"]),
    Mutant("LoRA B not scaled by alpha / r", "onnx_rewriter/reference/lora.py", [
        ("            value = value * (alpha / (math.sqrt(r) if rs else r))", "            value = value * 1.0")],
        ["tests/test_lora.py::test_adapter_changes_the_model_and_is_converted_as_process_lora"]),
    # ---------------------------------------------------------------- VLM text decoder (vlm, mrope_table, layers)
    Mutant("M-RoPE sin side not checked against cos", "patterns/mrope_table.py", [
        ('        check(np.array_equal(g, _picks(ctx.graph, sins[0], producer(sin_table).inputs[0], half)),',
         '        check(True or np.array_equal(g, _picks(ctx.graph, sins[0], producer(sin_table).inputs[0], half)),')],
        ["tests/patterns/test_mrope_table.py::test_sin_picks_differently"]),
    Mutant("Qwen3-VL interleave with h and w rows swapped", "onnx_rewriter/matching/results.py", [
        ("np.where((i % 3 == 1) & (i < 3 * s_h), 1, np.where((i % 3 == 2) & (i < 3 * s_w), 2, 0))",
         "np.where((i % 3 == 2) & (i < 3 * s_h), 1, np.where((i % 3 == 1) & (i < 3 * s_w), 2, 0))")],
        ["tests/patterns/test_mrope_table.py::test_interleaved"]),
    Mutant("M-RoPE interleaved sections checked for divisibility by 8", "onnx_rewriter/features/vlm.py", [
        ("        if not interleaved and any(s % 8 for s in sections):", "        if any(s % 8 for s in sections):")],
        [C + "test_mrope_sections_accepted_and_refused"]),
    Mutant("M-RoPE config.json without mrope_interleaved", "onnx_rewriter/features/vlm.py", [
        ('        if info.get("mrope_interleaved"):', "        if False:")],
        [C + "test_mrope_sections_accepted_and_refused"]),
    Mutant("M-RoPE rotary width 32 let through", "onnx_rewriter/features/vlm.py", [
        ("ROTARY_DIMS = (64, 128)", "ROTARY_DIMS = (32, 64, 128)")],
        [C + "test_mrope_rotary_width_the_runtime_cannot_build_is_refused"]),
    # ---------------------------------------------------------------- fused q/k/v (projections)
    Mutant("fused q/k/v: k and v bias slices swapped", "onnx_rewriter/projections.py", [
        ('b = None if adds[0] is None else _concat_constant(f"{stem}/bias", [add_bias(a) for a in adds])',
         'b = None if adds[0] is None else _concat_constant(f"{stem}/bias", [add_bias(a) for a in (adds[0], adds[2], adds[1])])')],  # noqa: E501
        [C + "test_fused_qkv_with_random_biases_verifies"]),
    Mutant("fused q/k/v: k and v weight columns swapped", "onnx_rewriter/projections.py", [
        ('w = _concat_constant(f"{stem}/weight", [m.inputs[1] for m in mms])',
         'w = _concat_constant(f"{stem}/weight", [mms[0].inputs[1], mms[2].inputs[1], mms[1].inputs[1]])')],
        ["tests/test_coverage.py::test_rewritten_and_verified[llama-float32]"]),
    Mutant("fused q/k/v: Split widths reversed", "onnx_rewriter/projections.py", [
        ('split = gs.Constant(f"{stem}/split", np.array(widths, dtype=np.int64))',
         'split = gs.Constant(f"{stem}/split", np.array(widths[::-1], dtype=np.int64))')],
        ["tests/test_coverage.py::test_rewritten_and_verified[llama-float32]"]),
    # ---------------------------------------------------------------- runtime-exact RoPE (exact, targets/base)
    Mutant("theta snapping tolerance widened 1000x", "onnx_rewriter/analysis/constants.py", [
        ("INV_FREQ_RTOL = 1e-6", "INV_FREQ_RTOL = 1e-3")],
        [C + "test_non_round_theta_is_not_snapped_to_a_round_one"]),
    Mutant("config theta written without checking it against the graph", "onnx_rewriter/analysis/constants.py", [
        ("        if _reproduces(float(theta), inv, rotary_dim, used):", "        if True:")],
        [C + "test_non_round_theta_is_not_snapped_to_a_round_one"]),
    Mutant("YaRN attention_scaling dropped from the layer's table", "onnx_rewriter/targets/base.py", [
        ("    table = np.concatenate([np.cos(f), np.sin(f)], axis=-1) * np.float32(layer.rope.attention_scaling)",
         "    table = np.concatenate([np.cos(f), np.sin(f)], axis=-1)")],
        [C + "test_yarn_table_carries_attention_scaling_and_verifies"]),
    # ---------------------------------------------------------------- vision encoder (vision/, patterns/vit_attention)
    Mutant("ViT attention scale: the factor on k'^T dropped", "patterns/vit_attention.py", [
        ("scale=s_out * s_q * s_k * s_q0 * s_k0,", "scale=s_out * s_q * s_q0 * s_k0,")],
        [C + "test_vit_attention_scale_split_over_q_and_k"]),
    Mutant("ViT attention scale: the factor on the roped k (before the transposes) dropped", "patterns/vit_attention.py", [  # noqa: E501
        ("scale=s_out * s_q * s_k * s_q0 * s_k0,", "scale=s_out * s_q * s_k * s_q0,")],
        [C + "test_vit_attention_scale_split_over_q_and_k"]),
    Mutant("vision: a scale other than 1/sqrt(D) let through on edgellm-0.9", "onnx_rewriter/vision/rewrite.py", [
        ("    if target.name in plugin.DEFAULT_SCALE_ONLY:\n", "    if False:\n")],  # noqa: E501
        [C + "test_vit_plugin_scale_exact_default_or_refused_on_09"]),
    Mutant("vision: an fp16-rounded 1/sqrt(D) written as read", "onnx_rewriter/vision/rewrite.py", [
        ("for t in (np.float16, np.float32)):\n        return default", "for t in (np.float32,)):\n        return default")],  # noqa: E501
        [C + "test_vit_plugin_scale_exact_default_or_refused_on_09"]),
    Mutant("vision rotary_pos_emb columns before rows", "onnx_rewriter/vision/host.py", [
        ("    return np.concatenate([freqs[:, 0], freqs[:, 1]], axis=-1)", "    return np.concatenate([freqs[:, 1], freqs[:, 0]], axis=-1)")],  # noqa: E501
        ["tests/vision/test_host.py::test_rotary_pos_emb_is_row_then_col_angles"]),
    Mutant("vision cu_seqlens one segment per image, not per frame", "onnx_rewriter/vision/host.py", [
        ("    lens = [h * w for t, h, w in np.asarray(grid_thw, dtype=np.int64).tolist() for _ in range(t)]",
         "    lens = [t * h * w for t, h, w in np.asarray(grid_thw, dtype=np.int64).tolist()]")],
        ["tests/vision/test_host.py::test_cu_seqlens_one_segment_per_frame"]),
    Mutant("vision window boundaries in merged tokens, not patches", "onnx_rewriter/vision/host.py", [
        ("(np.cumsum(counts) * merge * merge + cu[-1])", "(np.cumsum(counts) * merge + cu[-1])")],
        ["tests/vision/test_host.py::test_window_index_matches_transformers"]),
    Mutant("vision bilinear taps without align-corners", "onnx_rewriter/vision/host.py", [
        ("np.float32(side - 1) / np.maximum(size - 1, 1)", "np.float32(side) / np.maximum(size, 1)")],
        ["tests/vision/test_host.py::test_bilinear_taps_match_transformers"]),
    # ---------------------------------------------------------------- MoE experts (issue 28)
    Mutant("MoE Marlin: word slot of a lane off by one", "onnx_rewriter/reference/moe.py", [
        ("    col = 128 * nt + 4 * (t % 32) + t // 32 + 0 * kt",
         "    col = 128 * nt + 4 * (t % 32) + (t // 32 + 1) % 4 + 0 * kt")],
        ["tests/reference/test_moe.py::test_marlin_bytes_match_nvidia"]),
    Mutant("MoE Marlin: nibbles 4 and 5 (k + 1 rows) swapped", "onnx_rewriter/reference/moe.py", [
        ("_MARLIN_OFFSETS = ((0, 0), (8, 0), (0, 8), (8, 8), (1, 0), (9, 0),",
         "_MARLIN_OFFSETS = ((0, 0), (8, 0), (0, 8), (8, 8), (9, 0), (1, 0),")],
        ["tests/reference/test_moe.py::test_marlin_bytes_match_nvidia"]),
    Mutant("MoE Marlin: grouped scale permutation off by one", "onnx_rewriter/reference/moe.py", [
        ("        return pos - j + (j // 8) + 8 * (j % 8)", "        return pos - j + (j // 8 + 1) % 8 + 8 * (j % 8)")],
        ["tests/reference/test_moe.py::test_marlin_bytes_match_nvidia"]),
    Mutant("MoE Marlin: per-channel scale permutation off by one", "onnx_rewriter/reference/moe.py", [
        ("    o = np.array([0, 1, 8, 9, 16, 17, 24, 25])", "    o = np.array([1, 0, 8, 9, 16, 17, 24, 25])")],
        ["tests/reference/test_moe.py::test_marlin_bytes_match_nvidia"]),
    Mutant("MoE Fp16MoePlugin FC1: gate read where up is (reference)", "onnx_rewriter/reference/moe.py", [
        ("    return blocks[:, :, 1].reshape(e, inter, h), blocks[:, :, 0].reshape(e, inter, h)",
         "    return blocks[:, :, 0].reshape(e, inter, h), blocks[:, :, 1].reshape(e, inter, h)")],
        ["tests/reference/test_moe.py::test_fp16_moe_plugin_matches_qwen3_moe_block",
         "tests/reference/test_moe.py::test_fc1_row_orders"]),
    Mutant("MoE Fp16MoePlugin FC1: packed gate first (packer)", "onnx_rewriter/features/moe/layout.py", [
        ("    blocks = np.stack([up.reshape(*lead, inter // b, b, h), gate.reshape(",
         "    blocks = np.stack([gate.reshape(*lead, inter // b, b, h), up.reshape(")],
        ["tests/reference/test_moe.py::test_fc1_row_orders"]),
    Mutant("MoE Int4MoePlugin FC1: up rows before gate", "onnx_rewriter/reference/moe.py", [
        ("    return w[:, :inter], w[:, inter:]", "    return w[:, inter:], w[:, :inter]")],
        ["tests/reference/test_moe.py::test_int4_moe_plugin_matches_qwen3_moe_block"]),
    Mutant("MoE Int4MoePlugin: renormalization dropped", "onnx_rewriter/reference/moe.py", [
        ("    return moe(router_logits, hidden_states, gate, up, fc2, top_k=k, renormalize=True)",
         "    return moe(router_logits, hidden_states, gate, up, fc2, top_k=k, renormalize=False)")],
        ["tests/reference/test_moe.py::test_int4_moe_plugin_matches_qwen3_moe_block"]),
    Mutant("MoE Fp16MoePlugin: norm_topk_prob ignored", "onnx_rewriter/reference/moe.py", [
        ('               renormalize=bool(int(attrs.get("norm_topk_prob", 1))))', "               renormalize=True)")],
        ["tests/reference/test_moe.py::test_fp16_moe_plugin_matches_qwen3_moe_block"]),
    Mutant("MoE GPTQ experts: zero point offset dropped", "onnx_rewriter/features/moe/layout.py", [
        ("    u = linear.q - linear.z[np.arange(k) // linear.group] + 8",
         "    u = linear.q - linear.z[np.arange(k) // linear.group] + 9")],
        ["tests/reference/test_moe.py::test_checkpoint_experts_become_marlin_bytes_exactly"]),
    Mutant("MoE feature: Fp16MoePlugin fc1 written gate-first", "onnx_rewriter/features/moe/__init__.py", [
        ("(layout.fp16_fc1(a[:i], a[i:])[None] for", "(layout.int4_fc1(a[:i], a[i:])[None] for")],
        ["tests/test_moe.py::test_fp16_moe_plugin_verifies[edgellm-0.11-2]"]),
    Mutant("MoE feature: RTN expert scales streamed from the wrong projection",
           "onnx_rewriter/features/moe/__init__.py", [
        ("            w, which = (b.gate_up, 0) if k < 2 else (b.down, 2)",
         "            w, which = (b.gate_up, 0) if k < 1 else (b.down, 2)")],
        ["tests/test_moe.py::test_int4_moe_plugin_verifies[edgellm-0.11-2]"]),
    Mutant("MoE pattern: every block read as renormalized", "patterns/moe_block.py", [
        ("        renormalize = bool(sums)", "        renormalize = True")],
        ["tests/patterns/test_moe_block.py::test_matches_and_reads_the_block"]),
    Mutant("MoE feature: shared expert added twice (NVIDIA I#158)", "onnx_rewriter/features/moe/__init__.py", [
        ("            replace_uses(g, b.out, out)\n",
         "            replace_uses(g, b.out, out)\n"
         "            for n in [n for n in list(g.nodes) if n.op == 'Add' and out in n.inputs]:\n"
         "                twice = gs.Variable(f'{prefix}/twice', np.float16, None)\n"
         "                g.nodes.append(gs.Node('Add', f'{prefix}/twice',"
         " inputs=[out, n.inputs[1 - n.inputs.index(out)]], outputs=[twice]))\n"
         "                n.inputs[n.inputs.index(out)] = twice\n")],
        ["tests/test_moe_qwen2.py::test_int4_experts_verify[edgellm-0.9]"]),
    Mutant("MoE routers: a Cast between Softmax and TopK not looked through", "onnx_rewriter/analysis/moe.py", [
        ('        readers += [r for c in readers if c.op == "Cast" for r in c.outputs[0].outputs]\n', "")],
        ["tests/test_moe_checkpoint.py::test_router_behind_a_cast_is_a_router"]),
    Mutant("EAGLE3 0.11: tree inputs before the q/k-norm gammas", "onnx_rewriter/features/eagle3.py", [
        ('            if self.plan.token_major and int(node.attrs.get("enable_qk_norm", 0)):\n                at += 2',
         '            if False:\n                at += 2')],
        ["tests/test_eagle3.py::test_qk_norm_base_on_011_puts_the_tree_after_the_gammas"]),
    Mutant("0.11 tree reference: q/k norms dropped", "onnx_rewriter/reference/plugin.py", [
        ("        qr = _rope_and_norm(q[rows], q_norm_weight, table[rows], rms_norm_eps, qk_norm_post_rope)\n"
         "        kr = _rope_and_norm(k[rows], k_norm_weight, table[rows], rms_norm_eps, qk_norm_post_rope)",
         "        qr, kr = apply_rope(q[rows], table[rows]), apply_rope(k[rows], table[rows])")],
        ["tests/reference/test_tree_attention.py::test_paged_tree_with_qk_norms_equals_plain_call"]),
    Mutant("MoE dense form: renormalization dropped", "onnx_rewriter/features/moe/dense.py", [
        ("    if b.renormalize:", "    if False:")],
        ["tests/test_moe.py::test_moe_dense_renormalized"]),
    Mutant("MoE GPTQ checkpoint: FC1 scales up before gate", "onnx_rewriter/features/moe/checkpoint.py", [
        ("np.concatenate([gs, us], axis=1)", "np.concatenate([us, gs], axis=1)")],
        ["tests/test_moe_checkpoint.py::test_gptq_moe_export_verifies_with_the_checkpoint_codes"]),
    Mutant("MoE verify: any routing flip followed, however far the router is off",
           "onnx_rewriter/verification/moe_routing.py", [
        ("            if eps > ROUTER_NOISE * max(", "            if False and eps > ROUTER_NOISE * max(")],
        ["tests/test_moe_routing.py::test_a_router_off_by_more_than_the_noise_is_an_error"]),
    Mutant("MoE verify: a followed flip keeps unrenormalized weights", "onnx_rewriter/verification/moe_routing.py", [
        ('            if getattr(module, "norm_topk_prob", False):', "            if False:")],
        ["tests/test_moe_routing.py::test_a_flip_within_the_router_noise_is_followed"]),
    # ---------------------------------------------------------------- already-quantized Q/DQ ONNX in (wa_onnx_in)
    Mutant("Q/DQ input: activation scale taken from the weight's DequantizeLinear", "onnx_rewriter/features/wa_onnx_in.py", [  # noqa: E501
        ('    small = {"input_scale": np.array(act.scale, np.float32)}',
         '    small = {"input_scale": np.array(w.scale.reshape(-1)[0], np.float32)}')],
        ["tests/test_wa_onnx_in.py::test_fp8_qdq_input_becomes_the_contract_form_and_verifies_against_itself"]),
    Mutant("Q/DQ input: INT8 [K, N] codes reshaped to [N, K] instead of transposed", "onnx_rewriter/features/wa_onnx_in.py", [  # noqa: E501
        ("        return np.ascontiguousarray(c if transposed else c.T)",
         "        return np.ascontiguousarray(c if transposed else c.reshape(c.shape[::-1]))")],
        ["tests/test_wa_onnx_in.py::test_int8_sq_qdq_input_on_09_keeps_codes_scales_and_smoothing"]),
    Mutant("Q/DQ input: per-channel INT8 weight scales in reverse channel order", "onnx_rewriter/features/wa_onnx_in.py", [  # noqa: E501
        ('        small["weight_scale"] = np.broadcast_to(w.scale.reshape(-1), (w.n,)).astype(np.float32)',
         '        small["weight_scale"] = np.broadcast_to(w.scale.reshape(-1)[::-1], (w.n,)).astype(np.float32)')],
        ["tests/test_wa_onnx_in.py::test_int8_sq_qdq_input_on_09_keeps_codes_scales_and_smoothing"]),
    Mutant("Q/DQ baseline verify: the cost reference keeps the activation Q/DQ", "onnx_rewriter/verification/wa_baseline.py", [  # noqa: E501
        ("        bypass[n.output[0]] = x\n", "        pass\n")],
        ["tests/test_wa_onnx_in.py::test_fp8_qdq_input_becomes_the_contract_form_and_verifies_against_itself"]),
    # ---------------------------------------------------------------- output-path safety
    Mutant("safety: protected folders compared before resolving symlinks", "onnx_rewriter/safety.py", [
        ("        p = resolved(p)\n        if _within(out, p) or _within(p, out):",
         "        p = Path(p)\n        if _within(out, p) or _within(p, out):")],
        [C + "test_overlap_is_judged_on_resolved_paths"]),
    Mutant("safety: output compared before resolving symlinks", "onnx_rewriter/safety.py", [
        ("    out = resolved(out)\n    for label, p in (folders", "    out = Path(out)\n    for label, p in (folders")],
        [C + "test_overlap_is_judged_on_resolved_paths"]),
    Mutant("safety: 'inside' as a string prefix (ckpt-edgellm inside ckpt)", "onnx_rewriter/safety.py", [
        ("    return a == b or b in a.parents", "    return str(a).startswith(str(b))")],
        [C + "test_sibling_whose_name_starts_with_the_checkpoints_is_allowed"]),
]


def copy_repo(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    # The editable install maps onnx_rewriter.patterns to ROOT/patterns: point the copy at its own.
    (dst / "onnx_rewriter" / "patterns").symlink_to("../patterns")


def apply(repo: Path, mutant: Mutant) -> None:
    path = repo / mutant.path
    text = path.read_text()
    for old, new in mutant.edits:
        if text.count(old) != 1:
            raise SystemExit(f"mutant '{mutant.name}': {old!r} occurs {text.count(old)} times in {mutant.path}; "
                             f"update tests/mutants.py to the current source")
        text = text.replace(old, new)
    path.write_text(text)


def run_tests(repo: Path, models: Path, tests: list[str]) -> tuple[list[str], str, float]:
    """(ids of failed tests, pytest's summary line, seconds)."""
    env = dict(os.environ, PYTHONPATH=str(repo), ONNX_REWRITER_TEST_MODELS=str(models))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *tests],
                          cwd=repo, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t0
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    return failed, summary, took


def union(mutants: list[Mutant]) -> list[str]:
    """Every mutant's tests once, in first-seen order (an id already covered by its file is dropped)."""
    out: list[str] = []
    for t in (t for m in mutants for t in m.tests):
        if t not in out and t.split("::")[0] not in out:
            out.append(t)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="run only mutants whose name contains one of these words")
    ap.add_argument("--write", help="write the result table (markdown) to this file")
    ap.add_argument("--models", help="keep the exports in this folder across runs (default: a temporary one)")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or any(w in m.name for w in args.only)]
    rows, survived = [], 0
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        tmp = Path(tmp)
        models = Path(args.models) if args.models else tmp / "models"
        control = tmp / "control"
        copy_repo(control)
        probe = subprocess.run([sys.executable, "-c", "import onnx_rewriter.patterns as p; print(p.__file__)"],
                               cwd=control, env=dict(os.environ, PYTHONPATH=str(control)), capture_output=True,
                               text=True).stdout.strip()
        if not probe.startswith(str(control)):
            raise SystemExit(f"the copy imports the package from {probe}, not from itself")
        failed, summary, took = run_tests(control, models, union(chosen))
        print(f"control (no mutation, the union of the lists): {summary} [{took:.0f} s]", flush=True)
        if failed or " passed" not in summary or "skipped" in summary:
            print("the unmutated tests fail (or skip: slow ones do not belong in a list); fix that first:\n"
                  + "\n".join(failed))
            return 1
        control_s = took
        for k, mutant in enumerate(chosen):
            repo = tmp / f"m{k}"
            copy_repo(repo)
            apply(repo, mutant)
            failed, summary, took = run_tests(repo, models, mutant.tests)
            survived += not failed
            caught = ", ".join(f.removeprefix("tests/") for f in failed) or "**none: SURVIVED**"
            rows.append((mutant.name, mutant.path, caught, took))
            print(f"{mutant.name}: {summary} [{took:.0f} s]\n    caught by: {caught}", flush=True)
            shutil.rmtree(repo)
    total = time.perf_counter() - t_all
    table = ["| deliberate bug | file | tests that failed | s |", "|---|---|---|---|"]
    table += [f"| {n} | `{p}` | {c} | {t:.0f} |" for n, p, c, t in rows]
    verdict = (f"{len(rows) - survived} of {len(rows)} mutants caught"
               f"{'' if not survived else f', {survived} SURVIVED'}; {total:.0f} s in all (the control run, "
               f"{control_s:.0f} s, included)")
    print("\n" + "\n".join(table) + "\n\n" + verdict)
    if args.write:
        write_doc(Path(args.write), table, verdict, chosen)
    return 1 if survived else 0


def write_doc(path: Path, table: list[str], verdict: str, chosen: list[Mutant]) -> None:
    lists = "".join(f"- {m.name}: " + ", ".join(f"`{t}`" for t in m.tests) + "\n" for m in chosen)
    path.write_text(
        "# Mutation check of the test suite\n\n"
        "`make mutants` (tests/mutants.py) puts one deliberate bug at a time into a copy of the rewriter and runs\n"
        "that mutant's own few tests on it (its documented subset, below: default-suite tests only, no slow\n"
        "ones); every bug must make at least one of them fail. The unmutated copy first runs the union of the\n"
        "lists once and must pass. The mutants are the bugs a reviewer would look for in each feature: swapped\n"
        "slices, signs, scales, boundaries, widened tolerances, paths compared before resolving.\n\n"
        "Many lists name `tests/test_feature_contracts.py`: contract tests written from docs/contract.md for the\n"
        "bug classes of issue 26 (FP8 scales against an independent amax of transformers' roped keys, a ViT\n"
        "scale split over q and k, INT4 + LoRA slot dims and a real adapter, an EOS id equal to V, a Gemm\n"
        "lm_head, symlinked and sibling output paths). They build their own models where the shared tiny\n"
        "fixtures could hide a bug (random non-zero q/k/v biases, a non-round theta, YaRN), so every mutant is\n"
        "caught whatever those fixtures hold.\n"
        "\n"
        f"Last run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, `make mutants` "
        f"(`python tests/mutants.py --write docs/mutants.md`), on the 2-core machine (nproc: {os.cpu_count()}).\n\n"
        + "\n".join(table) + f"\n\n{verdict}.\n\n## Each mutant's tests\n\n" + lists)


if __name__ == "__main__":
    sys.exit(main())
