"""--lora and path-style linear names: every decoder linear is named after its HF module, with or without
--lora; --lora adds NVIDIA insert-lora's inputs and nodes; a random PEFT adapter fed to them matches
transformers + PEFT (merged) on edgellm-0.9 and edgellm-0.11, and rank-0 inputs match the base model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_rewriter import linear_names
from onnx_rewriter.cli import main
from onnx_rewriter.pipeline import steps as pipeline
from onnx_rewriter.reference.lora import adapter_feeds, lora_inputs
from onnx_rewriter.verification.llm import verify

MODULES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
STEMS = [f"model.layers.{i}.{m}" for i in range(2) for m in MODULES]
# tiny qwen2: hidden 64, 2 kv heads of 16, MLP 128
KN = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (64, 32), "self_attn.v_proj": (64, 32),
      "self_attn.o_proj": (64, 64), "mlp.gate_proj": (64, 128), "mlp.up_proj": (64, 128), "mlp.down_proj": (128, 64)}
RANK, ALPHA = 4, 8


def _linear_names(out: Path) -> list[str]:
    model = onnx.load(str(out / "model.onnx"))
    inits = {t.name for t in model.graph.initializer}
    return sorted(n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits)


def make_adapter(ckpt: Path, out: Path) -> Path:
    """A random PEFT LoRA adapter (A and B both random, so it changes the logits) on every projection."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=[m.split(".")[1] for m in MODULES],
                     init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def qwen2(models):
    return models.baseline("qwen2"), models.checkpoint("qwen2")


@pytest.fixture(scope="module")
def adapter(qwen2, tmp_path_factory):
    return make_adapter(qwen2[1], tmp_path_factory.mktemp("adapter") / "adapter")


def test_stem_rule_and_names():
    assert linear_names.node_name("model.layers.12.mlp.down_proj") == "/model/layers.12/mlp/down_proj/MatMul"
    assert linear_names.stem("/model/layers.12/mlp/down_proj/MatMul") == "model.layers.12.mlp.down_proj"
    assert linear_names.stem("/model/layers.0/mlp/down_proj/Int4GroupwiseGemmPlugin") == "model.layers.0.mlp.down_proj"
    assert linear_names.stem("node_MatMul_9") == "ode_MatMul_9"  # why NVIDIA's own exports cannot bind (§13.4)


def test_name_sources_on_a_hand_built_graph():
    """Metadata path, a path-style name under a wrapper (TorchScript of our wrapper: `/m/model/...`), a
    `<module>.weight` initializer, and nothing (kept, listed)."""
    import onnx_graphsurgeon as gs

    x = gs.Variable("x", np.float32, [1, 2, 4])
    nodes = []
    for i, (name, wname) in enumerate([("node_MatMul_1", "val_1"), ("/m/model/layers.3/mlp/up_proj/MatMul", "w2"),
                                       ("node_linear_7", "m.model.layers.0.self_attn.o_proj.weight"),
                                       ("node_MatMul_9", "val_9"), ("node_lm", "val_lm")]):
        nodes.append(gs.Node("MatMul", name=name, inputs=[x, gs.Constant(wname, np.ones((4, 4), np.float32))],
                             outputs=[gs.Variable(f"y{i}", np.float32)]))
    g = gs.Graph(nodes=nodes, inputs=[x], outputs=[n.outputs[0] for n in nodes])
    res = linear_names.name_linears(g, {"node_MatMul_1": "model.layers.12.self_attn.q_proj"}, nodes[-1])
    assert [n.name for n in nodes] == ["/model/layers.12/self_attn/q_proj/MatMul", "/model/layers.3/mlp/up_proj/MatMul",
                                       "/model/layers.0/self_attn/o_proj/MatMul", "node_MatMul_9", "/lm_head/MatMul"]
    assert res == {"named": 4, "unnamed": ["node_MatMul_9"]}


@pytest.mark.parametrize("family,flavour", [
    ("qwen2", {}), pytest.param("llama", {"exporter": "torchscript"}, marks=pytest.mark.slow)])
def test_linears_are_named_after_their_modules_without_lora(models, tmp_path, family, flavour):
    """What insert-lora derives its binding names from; lm_head's name keeps it out."""
    pipeline.rewrite(models.baseline(family, **flavour), tmp_path / "out", fuse_qkv=False)
    assert _linear_names(tmp_path / "out") == sorted([linear_names.node_name(s) for s in STEMS] + ["/lm_head/MatMul"])
    # by default q/k/v are one MatMul (projections.py), named after the fused module
    pipeline.rewrite(models.baseline(family, **flavour), tmp_path / "fused")
    qkv = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}
    fused = [s for s in STEMS if s.split(".", 3)[3] not in qkv]
    fused += [f"model.layers.{i}.self_attn.qkv_proj" for i in range(2)]
    assert _linear_names(tmp_path / "fused") == sorted([linear_names.node_name(s) for s in fused] + ["/lm_head/MatMul"])


@pytest.mark.parametrize("target", ["edgellm-0.9", "edgellm-0.10", "edgellm-0.11"])
def test_lora_inputs_and_adapter_verify(qwen2, adapter, tmp_path, target):
    base, ckpt = qwen2
    out = tmp_path / "out"
    run = pipeline.rewrite(base, out, target=target, lora=True)
    assert run.options.fuse_qkv is False
    assert [s["binding"] for s in run.report.features["lora"]["slots"]] == STEMS
    model = onnx.load(str(out / "model.onnx"))
    dims = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input if "lora" in i.name}
    want = {}
    for s in STEMS:
        k, n = KN[s.split(".", 3)[3]]
        want[f"{s}.lora_A.weight"] = [k, f"{s}.rank"]
        want[f"{s}.lora_B.weight"] = [f"{s}.rank", n]
    assert dims == want
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in model.graph.input if "lora" in i.name)
    g = "/model/layers.1/mlp/down_proj/MatMul"
    nodes = {n.name: n for n in model.graph.node}
    assert list(nodes[f"{g}/lora_matmul_A"].input)[1] == "model.layers.1.mlp.down_proj.lora_A.weight"
    assert list(nodes[f"{g}/lora_add"].input) == [nodes[g].output[0], f"{g}/lora_gemm_out"]
    assert not any("lm_head" in n for n in dims)
    # the adapter's A/B fed to the inputs = transformers + PEFT with the adapter merged
    res = verify(out, model=str(ckpt), lora_adapter=str(adapter), steps=3, quiet=True)
    assert res.passed, res.table()
    # rank-0 inputs (the runtime's dummies) = the base model
    res = verify(out, model=str(ckpt), steps=3, quiet=True)
    assert res.passed, res.table()


def test_adapter_changes_the_model_and_is_converted_as_process_lora(qwen2, adapter, tmp_path):
    """The adapter moves the logits far (so the verify above cannot pass without it), and its tensors reach the
    inputs transposed, B scaled by alpha / r, in fp16."""
    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    _, ckpt = qwen2
    ids = torch.tensor([[5, 60, 70, 80, 90, 100]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
        a = base(ids).logits[0, -1]
        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()
        b = merged(ids).logits[0, -1]
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) < 0.9
    inputs = {f"{s}.lora_{x}.weight": None for s in STEMS for x in "AB"}
    feeds = adapter_feeds(adapter, inputs, np.float16)
    raw = load_file(str(adapter / "adapter_model.safetensors"))
    key = "model.layers.0.self_attn.k_proj"
    a_in, b_in = raw[f"base_model.model.{key}.lora_A.weight"], raw[f"base_model.model.{key}.lora_B.weight"]
    assert a_in.shape == (RANK, 64) and b_in.shape == (32, RANK)
    np.testing.assert_array_equal(feeds[f"{key}.lora_A.weight"], a_in.T.astype(np.float16))
    np.testing.assert_array_equal(feeds[f"{key}.lora_B.weight"], (b_in.T * (ALPHA / RANK)).astype(np.float16))
    assert len(feeds) == len(inputs)


def test_adapter_for_another_model_is_refused(qwen2, adapter, tmp_path, capsys):
    base, ckpt = qwen2
    out = tmp_path / "out"
    pipeline.rewrite(base, out, lora=True)
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(bad / "adapter_model.safetensors"))
    tensors = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    code = main(["verify", str(out), "--model", str(ckpt), "--lora-adapter", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines()[-1].startswith(
        "error: --lora-adapter: 'base_model.model.model.layers.7.")
    code = main(["verify", str(out), "--baseline", str(base), "--lora-adapter", str(adapter)])
    assert code == 2 and "--lora-adapter needs --model" in capsys.readouterr().err
    assert lora_inputs(onnx.load(str(out / "model.onnx")))  # the folder itself was fine


def _nvidia_bin() -> Path | None:
    """NVIDIA's tools (tensorrt-edgellm 0.11.0): EDGELLM_NVIDIA_BIN, or bench/.venv-nvidia (make bench)."""
    for d in (os.environ.get("EDGELLM_NVIDIA_BIN"), Path(__file__).parents[1] / "bench" / ".venv-nvidia" / "bin"):
        if d and (Path(d) / "tensorrt-edgellm-insert-lora").is_file():
            return Path(d)
    return None


@pytest.mark.skipif(_nvidia_bin() is None, reason="NVIDIA's tensorrt-edgellm-insert-lora is not installed "
                                                  "(set EDGELLM_NVIDIA_BIN or run make bench)")
@pytest.mark.parametrize("int4", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_nvidia_insert_lora_on_our_output_equals_our_lora(models, qwen2, adapter, tmp_path, int4):
    """insert-lora on our plain output finds every linear under the adapter's names: same inputs and LoRA nodes
    as --lora (FP16 MatMuls on 0.9; INT4 V2 plugins on 0.11), and its FP16 graph verifies with the adapter."""
    base, ckpt = qwen2
    opts = {}
    if int4:  # K and N multiples of 128
        base = models.baseline("qwen2", hidden_size=128, intermediate_size=256, num_attention_heads=8,
                               num_key_value_heads=8)
        opts = dict(quantize="int4", target="edgellm-0.11")
    # q/k/v unfused, as --lora has them (fused, insert-lora would bind one qkv_proj slot, as on NVIDIA's exports)
    pipeline.rewrite(base, tmp_path / "plain", fuse_qkv=False, **opts)
    pipeline.rewrite(base, tmp_path / "ours", lora=True, **opts)
    subprocess.run([str(_nvidia_bin() / "tensorrt-edgellm-insert-lora"), "--onnx_dir", str(tmp_path / "plain")],
                   check=True, capture_output=True, timeout=300)
    theirs = onnx.load(str(tmp_path / "plain" / "lora_model.onnx"))
    ours = onnx.load(str(tmp_path / "ours" / "model.onnx"))

    def lora(m):
        return ({i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]
                 for i in m.graph.input if "lora" in i.name},
                sorted((n.name, n.op_type, tuple(n.input)) for n in m.graph.node if "lora" in n.name))

    assert lora(theirs) == lora(ours)
    assert len(lora(ours)[0]) == 2 * len(STEMS)
    if int4:
        assert sum(n.op_type == "Int4GroupwiseGemmPluginV2" for n in ours.graph.node) == len(STEMS)
        return
    (tmp_path / "plain" / "model.onnx").unlink()
    (tmp_path / "plain" / "lora_model.onnx").rename(tmp_path / "plain" / "model.onnx")
    res = verify(tmp_path / "plain", model=str(ckpt), lora_adapter=str(adapter), steps=2, quiet=True)
    assert res.passed, res.table()
