"""`make bench`: wall time and peak memory of our tools against their peers, measured in the same run.

    .venv/bin/python bench/run.py [--sizes tiny,0.5b,1.5b,3b,8b] [--verify tiny,0.5b] [--no-nvidia] [--mem-cap-gb 18]

Per size (random-weight bf16 checkpoints with real model dimensions, built once into bench/.cache; 3b and 8b
sharded like their releases and written shard by shard, bench/big_checkpoint.py):
  (a) rewrite: `python -m onnx_rewriter base.onnx out` (default options) vs onnxscript's `optimize_for_ort`
      (bench/peer_ort.py) on the same fp32 dynamo baseline file;
  (b) export: what `make export TARGET=edgellm-0.11` runs (`python -m onnx_rewriter export`) vs NVIDIA's
      `tensorrt-edgellm-export` 0.11.0 (its own venv, bench/.venv-nvidia, since it pins its own
      transformers/onnx), on the same bf16 checkpoint.
  (c) quantize: the same baseline rewritten FP16, with `--quantize int4` (RTN) and with `--int4-method awq`
      (time, peak RSS, output size), and the logit agreement of RTN and AWQ with the model on held-out
      prompts (bench/int4_agreement.py).
  (e) wa: the same baseline rewritten FP16 and with `--quantize fp8` / `nvfp4` (calibrated W+A, edgellm-0.11):
      time, peak RSS, output size; on smol also INT8-SQ with the smoothing search off / on and each folder's
      agreement with the model on held-out prompts (bench/wa_agreement.py).
  (d) graph: the same baseline rewritten for every target: nodes, nodes per layer and plumbing ops, against
      NVIDIA's 0.11.0 export of the same checkpoint (size `smol`: the real SmolLM2-135M `make demo` builds).
Every tool runs in a child process; wall time, peak RSS (largest process of its tree) and CPU time come
from os.wait4. A watchdog polls the resident set of each child's process tree and kills the tree above
--mem-cap-gb (the machine is shared): the report then says "killed at N GB after T s". Also counted: layers
each tool fused (AttentionPlugin nodes, or ORT attention nodes).
Timings on a shared machine drift; the ratios compare tools measured back to back.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
NV_VENV = HERE / ".venv-nvidia"
PY = sys.executable

# Random weights, real dimensions.
SIZES = {
    "tiny": dict(num_hidden_layers=2),
    # Qwen2.5-0.5B
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
                 initializer_range=0.02,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # SmolLM2-135M-Instruct, the real pretrained 30-layer Llama `make demo` builds (onnx_rewriter.demo)
    "smol": None,
    # DeepSeek-R1-Distill-Qwen-1.5B
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=False, max_position_embeddings=131072,
                 initializer_range=0.02,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # Qwen2.5-3B and Llama-3.1-8B: sharded like their releases (BIG), built shard by shard (big_checkpoint.py)
    "3b": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
               intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
               rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=131072,
               rms_norm_eps=1e-5,
               rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # Qwen3-30B-A3B's layer dimensions (128 experts of I = 768, top-8, 32 / 4 heads of 128), 2 of its 48 layers;
    # moe-dense: a dense Qwen3 of the same size (its MLP as wide as all 128 experts), the FP16 reference (--only moe)
    "moe": dict(hidden_size=2048, num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                intermediate_size=6144, decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936,
                tie_word_embeddings=False, max_position_embeddings=40960, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "moe-dense": dict(hidden_size=2048, num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=4,
                      head_dim=128, intermediate_size=128 * 768, vocab_size=151936, tie_word_embeddings=False,
                      max_position_embeddings=40960, rms_norm_eps=1e-6,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}
# size -> transformers config class of the sharded random checkpoints (bench/big_checkpoint.py, <= 5 GB shards)
SIZES["moe-4l"] = {**SIZES["moe"], "num_hidden_layers": 4}  # twice the layers: the INT4 MoE peak must not move
BIG = {"3b": "Qwen2Config", "8b": "LlamaConfig", "moe": "Qwen3MoeConfig", "moe-dense": "Qwen3Config",
       "moe-4l": "Qwen3MoeConfig"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# Starts the tool and reports its rusage. A child's ru_maxrss starts at its parent's resident set when it is
# spawned (Linux records the forked memory's high-water mark at exec), so a tool spawned straight from this
# process, which holds the graphs it measured, would report this process's size: 1.9 GB for a 1.1 GB export.
_LAUNCH = ("import json, os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); _, st, ru = os.wait4(p.pid, 0); "
           "open(sys.argv[1], 'w').write(json.dumps([os.waitstatus_to_exitcode(st), ru.ru_maxrss, "
           "ru.ru_utime + ru.ru_stime]))")


MEM_CAP_GB = 18.0  # --mem-cap-gb: a tool whose process tree holds more is killed (the machine is shared)
_PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss(root: int) -> int:
    """Resident bytes of `root` and all its descendants (from /proc; shared pages count in each process)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/statm") as fh:
                total += int(fh.read().split()[1]) * _PAGE
        except (OSError, ValueError, IndexError):
            pass
        todo += children.get(pid, [])
    return total


class Watchdog:
    """Polls the resident set of a child's process tree every 0.2 s; kills the tree (its own session) above
    `cap_gb`. `peak` is the largest tree total it saw, `killed` (GB, s) when it killed."""

    def __init__(self, proc: subprocess.Popen, cap_gb: float):
        self.proc, self.cap, self.peak, self.killed = proc, cap_gb * 2**30, 0, None
        self.t0 = time.perf_counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            rss = tree_rss(self.proc.pid)
            self.peak = max(self.peak, rss)
            if rss > self.cap and self.killed is None:
                self.killed = (round(rss / 2**30, 1), round(time.perf_counter() - self.t0, 1))
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except OSError:
                    pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def measure(name: str, cmd: list, env: dict | None = None) -> dict:
    """Run `cmd` as a child (through a small launcher, see _LAUNCH) under a memory watchdog (MEM_CAP_GB); its
    output goes to bench/.cache/logs/<name>.log."""
    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    usage = logs / f"{name}.rusage.json"
    usage.unlink(missing_ok=True)
    os.sync()  # the previous tool's dirty pages would otherwise be flushed on this one's time
    with open(logs / f"{name}.log", "w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen([PY, "-c", _LAUNCH, usage, *(str(c) for c in cmd)], stdout=fh,
                                stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ, **(env or {})),
                                start_new_session=True)  # its own process group: the watchdog kills all of it
        dog = Watchdog(proc, MEM_CAP_GB)
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        finally:
            dog.close()
        wall = time.perf_counter() - t0
    rc, maxrss, cpu = os.waitstatus_to_exitcode(status), ru.ru_maxrss, ru.ru_utime + ru.ru_stime
    if usage.is_file():  # the tool's own numbers (the launcher's are the fallback)
        rc, maxrss, cpu = json.loads(usage.read_text())
    text = (logs / f"{name}.log").read_text(errors="replace")
    res = dict(name=name, rc=rc, wall_s=round(wall, 2), peak_mb=round(maxrss / 1024),
               tree_peak_mb=round(dog.peak / 2**20), cpu_s=round(cpu, 2),
               log=str(logs / f"{name}.log"), tail=text[-600:])
    if dog.killed:
        res["killed"] = f"killed at {dog.killed[0]} GB after {dog.killed[1]} s (--mem-cap-gb {MEM_CAP_GB:g})"
        log(f"  {name}: {res['killed']}")
    else:
        log(f"  {name}: rc={res['rc']} wall {res['wall_s']} s, peak {res['peak_mb']} MB "
            f"(tree {res['tree_peak_mb']} MB), cpu {res['cpu_s']} s")
    return res


def _log_text(r: dict) -> str:
    return Path(r["log"]).read_text(errors="replace")


def _python(code: str, *args) -> list:
    return [PY, "-c", code, *map(str, args)]


def checkpoint(size: str) -> Path:
    path = CACHE / f"ckpt-{size}"
    if not (path / "config.json").is_file():
        shutil.rmtree(path, ignore_errors=True)
        if SIZES[size] is None:
            log(f"building the real {size} checkpoint (make demo's) into {path}")
            r = measure(f"build-{size}", [PY, "-m", "onnx_rewriter.demo", path])
        elif size in BIG:  # shard by shard, never the whole model in memory
            log(f"building the {size} checkpoint (random bf16 weights, <= 5 GB shards) into {path}")
            r = measure(f"build-{size}", [PY, HERE / "big_checkpoint.py", path, BIG[size], json.dumps(SIZES[size])])
        else:
            log(f"building the {size} checkpoint (random bf16 weights) into {path}")
            code = ("import json, sys; from onnx_rewriter.hf import tiny; "
                    "tiny.build_checkpoint('qwen2', sys.argv[1], dtype='bfloat16', **json.loads(sys.argv[2]))")
            r = measure(f"build-{size}", _python(code, path, json.dumps(SIZES[size])))
        if r["rc"]:
            raise SystemExit(f"could not build the {size} checkpoint:\n{r.get('killed') or r['tail']}")
    shards = sorted(path.glob("*.safetensors"))
    log(f"  {size} checkpoint: {sum(f.stat().st_size for f in shards) / 1e9:.2f} GB on disk in {len(shards)} "
        f"safetensors file(s) ({shutil.disk_usage(CACHE).free / 1e9:.0f} GB free)")
    return path


def checkpoint_gb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e9, 2)


def baseline(size: str, ckpt: Path, torch_dtype: str = "float32") -> tuple[Path, dict | None]:
    """The fp32 dynamo export both rewriters read (config and tokenizer beside it, as users have them);
    torch_dtype "export": the checkpoint's own bf16."""
    path = CACHE / (f"base-{size}" if torch_dtype == "float32" else f"base-{size}-{torch_dtype}")
    if (path / "model.onnx").is_file():
        return path / "model.onnx", None
    log(f"exporting the {size} baseline ({'fp32' if torch_dtype == 'float32' else 'bf16'}, dynamo) into {path}")
    shutil.rmtree(path, ignore_errors=True)
    code = ("import sys, shutil, pathlib; from onnx_rewriter.hf.export import load_model, export_baseline; "
            "src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]); out.mkdir(parents=True); "
            "m, _ = load_model(str(src), torch_dtype=sys.argv[3]); export_baseline(m, out / 'model.onnx'); "
            "[shutil.copy(f, out / f.name) for f in src.iterdir() "
            " if f.suffix in ('.json', '.jinja') and f.name != 'generation_config.json']")
    r = measure(f"baseline-{size}", _python(code, ckpt, path, torch_dtype))
    if r["rc"]:
        raise SystemExit(f"could not export the {size} baseline:\n{r['tail']}")
    return path / "model.onnx", r


def count_nodes(model_path: Path, op_type: str = "AttentionPlugin") -> int | None:
    import onnx

    if not model_path.is_file():
        return None
    return sum(n.op_type == op_type for n in onnx.load(str(model_path), load_external_data=False).graph.node)


def graph_stats(model_path: Path) -> dict | None:
    """Node count, layers (AttentionPlugin nodes), op histogram and nodes per layer: the median over
    consecutive plugins of how many nodes plugin i+1 needs that plugin i does not (its ancestors), i.e. one
    layer's MLP, norms, projections, plumbing and plugin, whatever the nodes are named."""
    import onnx

    if model_path is None or not model_path.is_file():
        return None
    nodes = list(onnx.load(str(model_path), load_external_data=False).graph.node)
    made_by = {o: i for i, n in enumerate(nodes) for o in n.output}

    def ancestors(i: int) -> set:
        seen, todo = set(), [i]
        while todo:
            j = todo.pop()
            if j not in seen:
                seen.add(j)
                todo += [made_by[t] for t in nodes[j].input if t in made_by]
        return seen

    plugins = [i for i, n in enumerate(nodes) if n.op_type == "AttentionPlugin"]
    anc = [ancestors(i) for i in plugins]
    diffs = sorted(len(b - a) for a, b in zip(anc, anc[1:]))
    hist: dict[str, int] = {}
    for n in nodes:
        hist[n.op_type] = hist.get(n.op_type, 0) + 1
    return dict(nodes=len(nodes), layers=len(plugins), per_layer=diffs[len(diffs) // 2] if diffs else None,
                ops=dict(sorted(hist.items(), key=lambda kv: -kv[1])))


KEEP_OUTPUTS = False


def drop_outputs(*paths: Path) -> None:
    """Outputs are measured, then removed (7 GB per tool at 1.5b) unless --keep-outputs."""
    if not KEEP_OUTPUTS:
        for p in paths:
            shutil.rmtree(p, ignore_errors=True)
            for tmp in p.parent.glob(f".{p.name}.tmp-*"):  # a killed tool's temporary output folder
                shutil.rmtree(tmp, ignore_errors=True)


def dir_mb(path: Path) -> int:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20) if path.exists() else 0


# ---------------------------------------------------------------- (a) rewrite vs optimize_for_ort


def bench_rewrite(size: str, base: Path, repeat: int) -> dict:
    """Each tool `repeat` times, alternating (neither always runs right after the other's 1-2 GB of
    writes); the fastest run of each counts, every wall time is kept."""
    ours_out, ort_out = CACHE / f"out-rewrite-{size}", CACHE / f"out-ort-{size}"
    runs = {"ort": [], "ours": []}
    for i in range(repeat):
        pair = [("ort", f"ort-{size}-{i}", [PY, HERE / "peer_ort.py", base, ort_out], ort_out),
                # default options, as users run it (inline model.onnx under 2 GB)
                ("ours", f"rewrite-{size}-{i}", [PY, "-m", "onnx_rewriter", base, ours_out, "-q"], ours_out)]
        for key, name, cmd, out in (pair if i % 2 == 0 else pair[::-1]):
            shutil.rmtree(out, ignore_errors=True)
            runs[key].append(measure(name, cmd))
    ort, ours = ({**min(rs, key=lambda r: (r["rc"] != 0, r["wall_s"])), "walls": [r["wall_s"] for r in rs],
                  "peaks": [r["peak_mb"] for r in rs]} for rs in (runs["ort"], runs["ours"]))
    try:
        ort["fused"] = json.loads(ort["tail"].strip().splitlines()[-1])["attention_nodes"]
    except (ValueError, IndexError, KeyError):
        ort["fused"] = None
    ours["fused"] = count_nodes(ours_out / "model.onnx")
    ours["out_mb"], ort["out_mb"] = dir_mb(ours_out), dir_mb(ort_out)
    drop_outputs(ours_out, ort_out)
    return {"ours": ours, "peer": ort}


# ---------------------------------------------------------------- (c) --quantize int4 vs the FP16 rewrite


# SmolLM2's down_proj has N = 576 outputs: edgellm-0.9's INT4 GEMM needs N % 128, 0.11's V2 takes N % 64.
QUANTIZE_TARGET = {"smol": "edgellm-0.11"}


def bench_quantize(size: str, base: Path, ckpt: Path) -> dict:
    """The same baseline rewritten FP16, INT4 RTN and INT4 activation-aware: wall, peak RSS (RTN keeps one
    weight in memory at a time, so flat in model size; AWQ also runs the baseline in onnxruntime to
    calibrate), output size; then each INT4 model's logit agreement with the FP model on held-out prompts."""
    res = {}
    runs = (("fp16", []), ("int4", ["--quantize", "int4"]),
            ("int4-awq", ["--quantize", "int4", "--int4-method", "awq"]))
    target = ["--target", QUANTIZE_TARGET[size]] if size in QUANTIZE_TARGET else []
    for key, extra in runs:
        out = CACHE / f"out-{key}-{size}"
        shutil.rmtree(out, ignore_errors=True)
        res[key] = measure(f"quantize-{key}-{size}", [PY, "-m", "onnx_rewriter", base, out, "--external-data", "-q",
                                                      *target, *extra])
        res[key]["out_mb"] = dir_mb(out)
        op = "Int4GroupwiseGemmPluginV2" if target else "Int4GroupwiseGemmPlugin"  # 0.11's default is V2
        res[key]["fused"] = count_nodes(out / "model.onnx", op) if key != "fp16" else None
    agree = measure(f"quantize-agreement-{size}", [PY, HERE / "int4_agreement.py", ckpt,
                                                   *(f"{k}={CACHE / f'out-{k}-{size}'}" for k in ("int4", "int4-awq"))])
    res["agreement"] = json.loads(agree["tail"].strip().splitlines()[-1]) if agree["rc"] == 0 else None
    drop_outputs(*(CACHE / f"out-{k}-{size}" for k, _ in runs))
    return res


# ---------------------------------------------------------------- (e) MoE: experts streamed like dense weights


def bench_moe(flat_only: bool = False) -> dict:
    """`moe` (Qwen3-30B-A3B layers) rewritten with --quantize int4 (Int4MoePlugin, RTN experts) and FP16
    (Fp16MoePlugin), against `moe-dense` (a dense model of the same size) rewritten FP16 and INT4: wall, peak
    RSS, output size. Both baselines are bf16 dynamo exports (the checkpoints' dtype; fp32 would double the
    baseline export's memory for nothing the rewrite measures). `flat_only` (--only moe-flat): the INT4 MoE
    rewrite of `moe` and of `moe-4l` (twice the layers) alone, the flatness check."""
    res = {}
    int4 = ("int4", ["--quantize", "int4"])
    plan = ((("moe", (int4,)), ("moe-4l", (int4,))) if flat_only else
            (("moe", (int4, ("fp16", []))), ("moe-dense", (("fp16", []), int4))))
    for size, runs in plan:
        ckpt = checkpoint(size)
        res[f"{size}-checkpoint_gb"] = checkpoint_gb(ckpt)
        base, built = baseline(size, ckpt, torch_dtype="export")
        res[f"{size}-baseline"] = built
        for key, extra in runs:
            out = CACHE / f"out-{key}-{size}"
            shutil.rmtree(out, ignore_errors=True)
            r = res[f"{size}-{key}"] = measure(f"moe-{key}-{size}", [PY, "-m", "onnx_rewriter", base, out,
                                                                     "--external-data", "-q", "--target",
                                                                     "edgellm-0.11", *extra])
            r["out_mb"] = dir_mb(out)
            moe = size.startswith("moe") and size != "moe-dense"
            r["fused"] = count_nodes(out / "model.onnx", "Int4MoePlugin" if moe and extra else
                                     "Fp16MoePlugin" if moe else "AttentionPlugin")
            drop_outputs(out)
    return res


# ---------------------------------------------------------------- (f) --quantize fp8 / nvfp4 / int8-sq vs FP16


def bench_wa(size: str, base: Path, ckpt: Path) -> dict:
    """The same baseline rewritten FP16 and with the calibrated W+A schemes (features/wa_calibrate.py, bundled
    prompts, edgellm-0.11): wall, peak RSS (weights quantized one at a time from blocks of input channels, the
    calibration run segment by segment: flat in model size), output size; on the real model (smol) also INT8-SQ
    without smoothing and each folder's agreement with the model on held-out prompts (bench/wa_agreement.py)."""
    res = {}
    runs = [("fp16", []), ("fp8", ["--quantize", "fp8"]), ("nvfp4", ["--quantize", "nvfp4"])]
    if size == "smol":
        runs += [("int8-sq-off", ["--quantize", "int8-sq", "--smoothquant-alpha", "off"]),
                 ("int8-sq", ["--quantize", "int8-sq"])]
    for key, extra in runs:
        out = CACHE / f"out-wa-{key}-{size}"
        shutil.rmtree(out, ignore_errors=True)
        res[key] = measure(f"wa-{key}-{size}", [PY, "-m", "onnx_rewriter", base, out, "--external-data", "-q",
                                                "--target", "edgellm-0.11", *extra])
        res[key]["out_mb"] = dir_mb(out)
    if size == "smol":
        agree = measure(f"wa-agreement-{size}", [PY, HERE / "wa_agreement.py", ckpt,
                                                 *(f"{k}={CACHE / f'out-wa-{k}-{size}'}" for k, _ in runs[1:])])
        res["agreement"] = json.loads(agree["tail"].strip().splitlines()[-1]) if agree["rc"] == 0 else None
    drop_outputs(*(CACHE / f"out-wa-{k}-{size}" for k, _ in runs))
    return res


# ---------------------------------------------------------------- (b) make export vs NVIDIA's exporter


def nvidia_exporter() -> tuple[Path | None, str]:
    """bench/.venv-nvidia with tensorrt-edgellm 0.11.0 (CPU torch first: the plain index pulls CUDA builds)."""
    exe = NV_VENV / "bin" / "tensorrt-edgellm-export"
    if exe.is_file():
        return exe, ""
    log(f"installing tensorrt-edgellm 0.11.0 into {NV_VENV} (once)")
    base_py = getattr(sys, "_base_executable", None) or sys.executable
    steps = [[base_py, "-m", "venv", NV_VENV],
             [NV_VENV / "bin" / "pip", "install", "-q", "torch==2.13.0"],
             [NV_VENV / "bin" / "pip", "install", "-q", "tensorrt-edgellm[export]==0.11.0"]]
    for i, cmd in enumerate(steps):
        r = measure(f"nvidia-install-{i}", cmd)
        if r["rc"]:
            return None, f"pip failed ({' '.join(map(str, cmd[-2:]))}): {r['tail'].strip().splitlines()[-1:]}"
    return (exe, "") if exe.is_file() else (None, "the package installed no tensorrt-edgellm-export script")


def nvidia_graph(size: str, ckpt: Path) -> dict | None:
    exe, why = nvidia_exporter()
    if exe is None:
        log(f"  NVIDIA's exporter is not available: {why}")
        return None
    out = CACHE / f"out-nvidia-graph-{size}"
    shutil.rmtree(out, ignore_errors=True)
    r = measure(f"nvidia-graph-{size}", [exe, ckpt, out], env={"CUDA_VISIBLE_DEVICES": ""})
    files = sorted(out.rglob("model.onnx")) if out.exists() else []
    g = graph_stats(files[0]) if files and r["rc"] == 0 else None
    drop_outputs(out)
    return g


def bench_export(size: str, ckpt: Path, nvidia: bool, verify: bool, target: str) -> dict:
    ours_out, nv_out = CACHE / f"out-export-{size}", CACHE / f"out-nvidia-{size}"
    for p in (ours_out, nv_out):
        shutil.rmtree(p, ignore_errors=True)
    res = {}
    # What `make export MODEL=... OUT=...` runs.
    ours = measure(f"export-{size}", [PY, "-m", "onnx_rewriter", "export", "--model", ckpt, "--output_dir", ours_out,
                                      "--target", target, "--dtype", "float16", "-v"])
    # -v: the log says whether the trace mapped the checkpoint's weights or loaded them, and why (hf/mapped_model.py)
    ours["weights"] = ("mapped" if "weights mapped from the checkpoint" in _log_text(ours)
                       else "loaded" if "is loaded to trace it" in _log_text(ours) else "?")
    ours["fused"] = count_nodes(ours_out / "model.onnx")
    ours["graph"] = graph_stats(ours_out / "model.onnx")
    ours["out_mb"] = dir_mb(ours_out)
    res["ours"] = ours
    if verify and ours["rc"] == 0:
        v = measure(f"verify-{size}", [PY, "-m", "onnx_rewriter", "verify", ours_out, "--model", ckpt])
        ours["verified"] = v["rc"] == 0
        ours["verify"] = v["tail"].strip().splitlines()[-1] if v["tail"].strip() else ""
    drop_outputs(ours_out)  # before the peer runs: room on the disk
    if not nvidia:
        res["peer_skipped"] = "--no-nvidia"
        return res
    exe, why = nvidia_exporter()
    if exe is None:
        log(f"  NVIDIA's exporter is not available: {why}")
        res["peer_skipped"] = why
        return res
    nv = measure(f"nvidia-{size}", [exe, ckpt, nv_out], env={"CUDA_VISIBLE_DEVICES": ""})
    if nv.get("killed"):
        res["peer_skipped"] = f"tensorrt-edgellm-export 0.11.0 {nv['killed']}"
    elif nv["rc"]:
        lines = [l for l in nv["tail"].strip().splitlines() if l.strip()]
        res["peer_skipped"] = f"tensorrt-edgellm-export failed (exit {nv['rc']}): {lines[-1] if lines else '?'}"
        log(f"  {res['peer_skipped']}")
    onnx_files = sorted(nv_out.rglob("model.onnx")) if nv_out.exists() else []
    nv["fused"] = count_nodes(onnx_files[0]) if onnx_files else None
    nv["graph"] = graph_stats(onnx_files[0]) if onnx_files and nv["rc"] == 0 else None
    nv["out_mb"] = dir_mb(nv_out)
    res["peer"] = nv
    drop_outputs(nv_out)
    return res


# ---------------------------------------------------------------- (d) graphs: ours per target vs NVIDIA's


TARGETS = ("edgellm-0.5", "edgellm-0.9", "edgellm-0.11")
SHOWN_OPS = ("MatMul", "Gemm", "Reshape", "Concat", "Split", "Unsqueeze", "Squeeze", "Transpose", "Shape")


def bench_graphs(size: str, base: Path) -> dict:
    """The same baseline rewritten for every target (default options, untimed): graph_stats of each."""
    res = {}
    for target in TARGETS:
        out = CACHE / f"out-graph-{size}-{target}"
        shutil.rmtree(out, ignore_errors=True)
        r = measure(f"graph-{size}-{target}", [PY, "-m", "onnx_rewriter", base, out, "--target", target, "-q",
                                               "--no-tokenizer"])
        res[target] = graph_stats(out / "model.onnx") if r["rc"] == 0 else None
        drop_outputs(out)
    return res


def graph_rows(size: str, graphs: dict, peer: dict | None) -> list[str]:
    """Per target: nodes, nodes per layer and the plumbing ops, ours against NVIDIA's 0.11.0 export of the
    same checkpoint (NVIDIA writes the 0.11 contract only: the 0.5 / 0.9 rows compare against that too)."""
    head = (f"{'size':<6}{'graph':<26}{'nodes':>7}{'/layer':>8}{'ratio':>7}  "
            + " ".join(f"{op:>9}" for op in SHOWN_OPS))
    rows = [head]

    def row(what, g, ratio_to=None):
        if g is None:
            rows.append(f"{size:<6}{what:<26}   (failed)")
            return
        r = f"{g['per_layer'] / ratio_to['per_layer']:.2f}" if ratio_to and g["per_layer"] else "-"
        rows.append(f"{size:<6}{what:<26}{g['nodes']:>7}{str(g['per_layer']):>8}{r:>7}  "
                    + " ".join(f"{g['ops'].get(op, 0):>9}" for op in SHOWN_OPS))

    row("NVIDIA 0.11.0 export", peer)
    for target, g in graphs.items():
        row(f"ours {target}", g, peer)
    rows.append(f"{'':<6}-> ratio: our nodes per layer / NVIDIA's (its 0.11 graph for every target); 'MatMul' "
                f"per layer: q/k/v as one, o, gate, up, down")
    return rows


# ---------------------------------------------------------------- report


def ratio(a, b) -> str:
    return f"{a / b:.1f}x" if a and b else "-"


def report(results: dict) -> None:
    rows = [f"{'size':<6}{'what':<34}{'wall s':>8}{'peak MB':>9}{'cpu s':>8}{'out MB':>8}{'fused':>7}{'tree MB':>9}"]

    def row(size, what, r):
        if r is None:
            return
        if r.get("killed"):
            rows.append(f"{size:<6}{what:<34}  {r['killed']}")
            return
        ok = "" if r.get("rc", 0) == 0 else f"  (exit {r['rc']})"
        rows.append(f"{size:<6}{what:<34}{r['wall_s']:>8}{r['peak_mb']:>9}{r['cpu_s']:>8}{r.get('out_mb', ''):>8}"
                    f"{str(r.get('fused', '')):>7}{r.get('tree_peak_mb', ''):>9}{ok}")

    for size, res in results.items():
        if res.get("checkpoint_gb"):
            rows.append(f"{size:<6}checkpoint: {res['checkpoint_gb']} GB of safetensors on disk")
        row(size, "baseline export (fp32, once)", res.get("baseline"))
        if "rewrite" in res:
            a = res["rewrite"]
            row(size, "rewrite (ours)", a["ours"])
            row(size, "optimize_for_ort (onnxscript)", a["peer"])
            rows.append(f"{'':<6}-> ours {ratio(a['peer']['wall_s'], a['ours']['wall_s'])} faster (best wall), "
                        f"{ratio(a['peer']['cpu_s'], a['ours']['cpu_s'])} less CPU, peak "
                        f"{a['ours']['peak_mb']} vs {a['peer']['peak_mb']} MB; all walls: ours {a['ours']['walls']}, "
                        f"peer {a['peer']['walls']}")
        if "quantize" in res:
            c = res["quantize"]
            row(size, "rewrite FP16", c["fp16"])
            row(size, "rewrite --quantize int4 (RTN)", c["int4"])
            row(size, "rewrite --int4-method awq", c.get("int4-awq"))
            rows.append(f"{'':<6}-> INT4 output {c['int4']['out_mb'] / max(c['fp16']['out_mb'], 1):.2f}x the FP16 one"
                        f" ('fused' = INT4 GEMM nodes)")
            for k, a in (c.get("agreement") or {}).items():
                rows.append(f"{'':<6}-> {k} vs the model, held-out prompts: cosine mean {a['cosine_mean']}, min "
                            f"{a['cosine_min']}, top-1 {a['top1']}")
        if "wa" in res:
            c = res["wa"]
            for k, r in c.items():
                if k != "agreement":
                    row(size, "rewrite FP16" if k == "fp16" else f"rewrite --quantize {k}", r)
            for k in ("fp8", "nvfp4"):
                if c.get(k) and c[k].get("peak_mb"):
                    rows.append(f"{'':<6}-> {k}: peak {c[k]['peak_mb'] / c['fp16']['peak_mb']:.2f}x the FP16 "
                                f"rewrite's, output {c[k]['out_mb'] / max(c['fp16']['out_mb'], 1):.2f}x")
            for k, a in (c.get("agreement") or {}).items():
                rows.append(f"{'':<6}-> {k} vs the model, held-out prompts: cosine mean {a['cosine_mean']}, min "
                            f"{a['cosine_min']}, top-1 {a['top1']}")
        if "export" in res:
            b = res["export"]
            row(size, f"make export (ours, {b['ours'].get('weights', '?')})", b["ours"])
            if "verified" in b["ours"]:
                rows.append(f"{'':<6}   verify: {b['ours']['verify']}")
            if "peer" in b:
                row(size, "tensorrt-edgellm-export 0.11.0", b["peer"])
            if "peer_skipped" in b:
                rows.append(f"{'':<6}-> NVIDIA's exporter not compared: {b['peer_skipped']}")
            elif b["peer"]["rc"] == 0 and b["ours"]["rc"] == 0:
                rows.append(f"{'':<6}-> ours {ratio(b['peer']['wall_s'], b['ours']['wall_s'])} faster (wall), peak "
                            f"{b['ours']['peak_mb']} vs {b['peer']['peak_mb']} MB: time ours / NVIDIA's "
                            f"{b['ours']['wall_s'] / b['peer']['wall_s']:.2f}, peak ours / NVIDIA's "
                            f"{b['ours']['peak_mb'] / b['peer']['peak_mb']:.2f}")
    for res in results.values():
        m = res.get("moe")
        if not m:
            continue
        for s in ("moe", "moe-dense", "moe-4l"):
            if f"{s}-checkpoint_gb" in m:
                rows.append(f"{s:<10}checkpoint: {m[f'{s}-checkpoint_gb']} GB of safetensors on disk")
                row(s, "baseline export (bf16, once)", m.get(f"{s}-baseline"))
        row("moe", "rewrite --quantize int4 (Int4MoePlugin)", m["moe-int4"])
        if "moe-4l-int4" in m:  # --only moe-flat
            two, four = m["moe-int4"], m["moe-4l-int4"]
            row("moe-4l", "rewrite --quantize int4 (Int4MoePlugin)", four)
            rows.append(f"{'':<6}-> INT4 MoE rewrite, 4 layers vs 2: peak "
                        f"{four['peak_mb'] / max(two['peak_mb'], 1):.2f}x, "
                        f"time {four['wall_s'] / max(two['wall_s'], 1e-9):.2f}x")
            continue
        row("moe", "rewrite FP16 (Fp16MoePlugin)", m["moe-fp16"])
        row("dense", "rewrite FP16 (same size, dense)", m["moe-dense-fp16"])
        row("dense", "rewrite --quantize int4 (dense)", m["moe-dense-int4"])
        moe, dense = m["moe-int4"], m["moe-dense-fp16"]
        rows.append(f"{'':<6}-> INT4 MoE rewrite peak {moe['peak_mb'] / max(dense['peak_mb'], 1):.2f}x the FP16 dense "
                    f"rewrite's, time {moe['wall_s'] / max(dense['wall_s'], 1e-9):.2f}x ('fused' = MoE plugins, or "
                    f"AttentionPlugins for the dense model)")
    for size, res in results.items():
        if "graphs" in res:
            peer = res.get("export", {}).get("peer", {}).get("graph") or res.get("graph_peer")
            rows.extend(graph_rows(size, res["graphs"], peer))
    small, big = results.get("0.5b", {}).get("rewrite"), results.get("1.5b", {}).get("rewrite")
    if small and big:
        rows.append(f"rewrite peak memory 1.5b / 0.5b: {big['ours']['peak_mb'] / small['ours']['peak_mb']:.2f}x "
                    f"(target <= 1.5x)")
    print("\n".join(rows))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="tiny,0.5b", help=f"comma list of {', '.join(SIZES)}")
    p.add_argument("--only", help="comma list of comparisons: rewrite, export, quantize, graph, wa (default: all); "
                   "moe alone: the MoE row (its own checkpoints moe and moe-dense); moe-flat alone: the INT4 MoE "
                   "rewrite at 2 and 4 layers")
    p.add_argument("--verify", default="tiny,0.5b", help="sizes whose export output is also verified")
    p.add_argument("--no-nvidia", action="store_true", help="skip NVIDIA's exporter")
    p.add_argument("--repeat", type=int, default=3, help="runs of each rewrite tool (the fastest counts)")
    p.add_argument("--keep-outputs", action="store_true", help="keep what the tools wrote in bench/.cache/out-*")
    p.add_argument("--mem-cap-gb", type=float, default=18.0,
                   help="kill a tool whose process tree holds more than this resident (default %(default)s GB)")
    p.add_argument("--export-target", default="edgellm-0.11",
                   help="our export's target (default: the contract NVIDIA's 0.11.0 exporter writes)")
    args = p.parse_args(argv)
    global KEEP_OUTPUTS, MEM_CAP_GB
    KEEP_OUTPUTS, MEM_CAP_GB = args.keep_outputs, args.mem_cap_gb
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    kinds = ("rewrite", "export", "quantize", "graph", "moe", "moe-flat", "wa")
    only = set(kinds) if args.only is None else {k.strip() for k in args.only.split(",") if k.strip()}
    if only - set(kinds):
        p.error(f"unknown comparison(s) {sorted(only - set(kinds))}; choose from {', '.join(kinds)}")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        p.error(f"unknown size(s) {unknown}; choose from {list(SIZES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = {}
    if only in ({"moe"}, {"moe-flat"}):  # its own checkpoints (moe, moe-dense or moe-4l), whatever --sizes says
        results["moe"] = {"moe": bench_moe(flat_only=only == {"moe-flat"})}
        (CACHE / "results.json").write_text(json.dumps(results, indent=1))
        report(results)
        return 0
    for size in sizes:
        log(f"== {size}")
        ckpt = checkpoint(size)
        res = results[size] = {"checkpoint_gb": checkpoint_gb(ckpt)}
        if "rewrite" in only:
            base, built = baseline(size, ckpt)
            res["baseline"] = built
            res["rewrite"] = bench_rewrite(size, base, args.repeat)
        if "quantize" in only:
            res["quantize"] = bench_quantize(size, baseline(size, ckpt)[0], ckpt)
        if "wa" in only:
            res["wa"] = bench_wa(size, baseline(size, ckpt)[0], ckpt)
        if "export" in only:
            res["export"] = bench_export(size, ckpt, not args.no_nvidia, size in args.verify.split(","),
                                         args.export_target)
        if "graph" in only:
            res["graphs"] = bench_graphs(size, baseline(size, ckpt)[0])
            if "export" not in only and not args.no_nvidia:  # NVIDIA's graph without the timed comparison
                res["graph_peer"] = nvidia_graph(size, ckpt)
        (CACHE / "results.json").write_text(json.dumps(results, indent=1))
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
