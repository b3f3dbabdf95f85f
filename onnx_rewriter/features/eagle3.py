"""EAGLE3 speculative decoding (`--eagle-base`, `--eagle-draft`; contract part 2 §11, part 3 §18).

Base (`--eagle-base [--eagle-layers 2,13,27]`): the plugin runs tree attention (`enable_tree_attention=1`,
the bit-packed tree mask and per-token RoPE positions as two more inputs), `last_token_ids` /
`logits_indices` select any number of rows, and a second output `hidden_states` (fp16) is the
concatenation, on the last axis, of the residual stream *entering* the chosen decoder layers (the input of
each layer's input norm, found in the matched graph), over every token of the call.

Draft (`--eagle-draft`, a plain export of hf/eagle3_draft.py): the same tree inputs, plus the inputs
`hidden_states_input` [.., 3·H_t] and `hidden_states_from_draft` [.., H]; `logits` become log-probs over
the draft vocabulary (LogSoftmax after the fp32 Cast) and `hidden_states` the pre-norm rows selected like
the logits. The folder gets `d2t.safetensors` and no embedding or tokenizer files.

What differs per target is in `PLANS`; a target without a plan is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_rewriter.features.base import Feature, FeatureOptions, fp16_plan, option

from ..errors import RewriteError, UnsupportedModel
from ..targets.base import B, S

D2T_FILE = "d2t.safetensors"
DRAFT_INPUTS = ("hidden_states_input", "hidden_states_from_draft")
TREE_LEN, TREE_WORDS = "tree_seq_len", "tree_mask_words"  # own dim symbols, not tied to S (§11.1)
TOKEN_MAJOR_WARNING = ("EAGLE3 on edgellm-0.11: the tree-attention semantics of runtime 0.11 (token-major packed mask, "
                       "committed prefix = attention_sequence_lengths - physical query width) are partly inferred "
                       "(contract part 3 §18.3) and not yet confirmed on a device")


@dataclass(frozen=True)
class Plan:
    token_major: bool
    tree_at: int  # plugin input index of the tree mask (the positions follow it); -1: after the others
    last_hidden: int  # default layers: [2, L//2, L - last_hidden]
    config_keys: tuple  # "0.7": model_type eagle3_*; "0.8": spec_decode_type / engine_role
    draft_needs_same_hidden: bool  # the builder sizes hidden_states_input as 3 x the draft's hidden size
    eagle3_config: bool = False  # the draft config gets eagle3_config {target_layer_ids, num_target_layers}
    note: str = ""  # a warning every rewrite for the target gets


PLANS = {
    "edgellm-0.5": Plan(False, 5, 3, ("0.7",), True),
    "edgellm-0.9": Plan(False, 7, 4, ("0.7", "0.8"), True),
    # 0.10: the tree group comes after the q/k-norm gammas (§17.2); the builder honours base_model_hidden_size
    "edgellm-0.10": Plan(False, -1, 4, ("0.8",), False),
    "edgellm-0.11": Plan(True, 6, 3, ("0.8",), False, eagle3_config=True, note=TOKEN_MAJOR_WARNING),
}
REFUSALS = ("EAGLE3", "has no EAGLE3 support",
            "the runtime's hidden_states and tree inputs are fp16")


def plan_for(target, dtype: str) -> Plan:
    """The target's plan; refused (by name) where it has none, or for an output dtype other than fp16."""
    return fp16_plan(PLANS, target, dtype, *REFUSALS)


def default_layers(target_name: str, num_layers: int) -> list[int]:
    plan = PLANS[target_name]
    return [2, num_layers // 2, num_layers - plan.last_hidden]


def parse_layers(value) -> list[int] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            return [int(x) for x in value.split(",") if x.strip()]
        except ValueError:
            raise RewriteError(f"--eagle-layers '{value}': give comma-separated layer numbers, e.g. 2,13,27") from None
    return [int(x) for x in value]


@dataclass
class Eagle3Options(FeatureOptions):
    eagle_base: bool = option(False, "--eagle-base", "EAGLE3 base model: tree attention and the hidden_states "
                              "output (the residual streams entering --eagle-layers)", action="store_true")
    eagle_draft: bool | str | None = option(
        None, "--eagle-draft", "rewrite: the input is a plain export of an EAGLE3 draft (no value); export: DIR, the "
        "draft checkpoint to export with the base", nargs="?", const=True, metavar="DIR")
    eagle_layers: str | list | None = option(None, "--eagle-layers", "with --eagle-base: the base layers whose input "
                                             "residual streams form hidden_states (default: the draft's "
                                             "target_layer_ids, else the target's default)", metavar="I,J,K")

    def enabled(self) -> bool:
        return bool(self.eagle_base) or self.eagle_draft is True

    def validate(self, target, options) -> None:
        layers = parse_layers(self.eagle_layers)
        if layers is not None and not self.eagle_base:
            raise RewriteError("--eagle-layers needs --eagle-base")
        if layers is not None and len(layers) != 3:
            raise RewriteError(f"--eagle-layers {self.eagle_layers}: EAGLE3 reads exactly 3 layers")
        if self.eagle_base and self.eagle_draft is True:
            raise RewriteError("--eagle-base and --eagle-draft: a folder is either the base or the draft")
        if self.eagle_draft not in (None, False, True) and not Path(str(self.eagle_draft)).is_dir():
            raise RewriteError(f"--eagle-draft '{self.eagle_draft}' is not a folder; give the EAGLE3 draft checkpoint")
        if self.enabled():
            plan_for(target, options.dtype)

    def imply(self, options) -> None:
        if self.eagle_draft is True:  # a draft folder has no tokenizer files (nor embedding, chat template)
            options.no_tokenizer = True

    def feature(self, options) -> Eagle3:
        return Eagle3("draft" if self.eagle_draft is True else "base", parse_layers(self.eagle_layers))


def residual_into(layer, norms: dict) -> gs.Tensor:
    """The residual stream entering `layer`: the input of the RMSNorm whose output feeds its q/k/v projection.
    Walks up from v to the first MatMul with a constant weight, then through Casts and the norm's weight Mul to
    a matched norm."""
    seen, stack = set(), [layer.v]
    for _ in range(64):
        if not stack:
            break
        t = stack.pop()
        if id(t) in seen or not t.inputs:
            continue
        seen.add(id(t))
        node = t.inputs[0]
        if node.op in ("MatMul", "Gemm") and any(isinstance(i, gs.Constant) for i in node.inputs[1:]):
            x = node.inputs[0]
            for _ in range(6):  # through Casts and the norm's weight Mul
                if id(x) in norms or not x.inputs:
                    break
                prod = x.inputs[0]
                if prod.op in ("Cast", "Identity"):
                    x = prod.inputs[0]
                elif prod.op == "Mul" and len(prod.inputs) == 2 and isinstance(prod.inputs[1], gs.Constant):
                    x = prod.inputs[0]
                elif prod.op == "Mul" and len(prod.inputs) == 2 and isinstance(prod.inputs[0], gs.Constant):
                    x = prod.inputs[1]
                else:
                    break
            if id(x) in norms:
                return norms[id(x)]
            raise UnsupportedModel(f"layer {layer.index}: the q/k/v projection '{node.name}' does not read a matched "
                                   f"RMSNorm; cannot find the residual stream entering the layer for EAGLE3")
        stack.extend(i for i in node.inputs if not isinstance(i, gs.Constant))
    raise UnsupportedModel(f"layer {layer.index}: no q/k/v projection found above v; cannot find the residual stream "
                           f"entering the layer for EAGLE3")


def read_d2t(folders, draft_vocab: int, vocab: int) -> np.ndarray:
    """The draft -> base offsets (int32 [V_d]) from a safetensors file holding `d2t` in one of `folders`; zeros (an
    identity map, valid under both runtime readings) when the draft vocabulary is the whole vocabulary."""
    from safetensors import safe_open

    for folder in folders:
        for f in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(str(f), "np") as st:
                if "d2t" in st.keys():
                    d2t = np.asarray(st.get_tensor("d2t")).astype(np.int64).reshape(-1)
                    if d2t.shape[0] != draft_vocab:
                        raise RewriteError(f"'{f}': d2t has {d2t.shape[0]} entries, the draft vocabulary {draft_vocab}")
                    target = np.arange(draft_vocab) + d2t
                    if target.min() < 0 or target.max() >= vocab:
                        raise RewriteError(f"'{f}': d2t maps draft ids outside the base vocabulary of {vocab}")
                    return d2t.astype(np.int32)
    if draft_vocab == vocab:
        return np.zeros(vocab, dtype=np.int32)
    where = ", ".join(f"'{f}'" for f in folders)
    raise RewriteError(f"--eagle-draft: no d2t tensor in a *.safetensors file in {where}; put the draft checkpoint's "
                       f"weights (or {D2T_FILE}) beside the input")


class Eagle3(Feature):
    name = "eagle3"

    def __init__(self, role: str, layers: list[int] | None = None):
        self.role, self.layers = role, layers
        self.writes_embedding = self.writes_tokenizer = role == "base"

    # -- check: which layers, the taps, the draft's facts
    def check(self, run, target) -> None:
        self.plan = plan_for(target, run.options.dtype)
        self.target_name = target.name
        if self.plan.note:
            run.warn(self.plan.note)
        if self.role == "base":
            self._check_base(run)
        else:
            self._check_draft(run)

    def _check_base(self, run) -> None:
        n = len(run.layers)
        if self.layers is None:
            self.layers = default_layers(self.target_name, n)
            run.warn(f"EAGLE3 base: hidden_states from layers {self.layers} ({self.target_name}'s default); the draft "
                     f"must have been trained on these (pass --eagle-layers, or export with --eagle-draft DIR to use "
                     f"the draft's target_layer_ids)")
        bad = [i for i in self.layers if not 0 <= i < n]
        if bad:
            raise UnsupportedModel(f"EAGLE3 base: layer {bad[0]} of {self.layers} is not a decoder layer of this "
                                   f"{n}-layer model (0..{n - 1}); give --eagle-layers")
        norms = {id(m.result.out): m.result.x for m in run.ctx.matches.get("rms_norm", {}).values()}
        by_index = {l.index: l for l in run.layers}
        inputs = {id(t) for t in run.source.graph.inputs}
        # the embedding Gather's output was replaced by the inputs_embeds input (step_embedding): a tap still
        # naming that detached tensor is the embedding itself
        self.taps = [t if t.inputs or id(t) in inputs else run.inputs_embeds
                     for t in (residual_into(by_index[i], norms) for i in self.layers)]
        self.hidden = int(run.spec["hidden_size"])
        run.report.features[self.name] = {"role": "base", "eagle_hidden_state_layers": list(self.layers),
                                          "taps": [t.name for t in self.taps]}

    def _check_draft(self, run) -> None:
        g = run.source.graph
        inputs = {t.name: t for t in g.inputs}
        missing = [n for n in DRAFT_INPUTS if n not in inputs]
        if missing:
            raise RewriteError(f"--eagle-draft: the input has no '{missing[0]}' graph input; give a plain export of an "
                               f"EAGLE3 draft (onnx_rewriter export --eagle-draft DIR writes one)")
        outputs = {t.name: t for t in g.outputs}
        if "hidden_states" not in outputs:
            raise RewriteError("--eagle-draft: the input has no 'hidden_states' output (the draft's pre-norm hidden "
                               "state); give a plain export of an EAGLE3 draft")
        if len(run.layers) != 1:
            raise UnsupportedModel(f"--eagle-draft: an EAGLE3 draft has one decoder layer, this graph has "
                                   f"{len(run.layers)}")
        cfg = run.hf_config or {}
        self.hidden = int(run.spec["hidden_size"])
        self.target_hidden = int(inputs["hidden_states_input"].shape[-1]) // 3
        if cfg.get("target_hidden_size") and int(cfg["target_hidden_size"]) != self.target_hidden:
            raise RewriteError(f"--eagle-draft: config.json says target_hidden_size {cfg['target_hidden_size']}, the "
                               f"graph's hidden_states_input is 3 x {self.target_hidden}")
        if self.plan.draft_needs_same_hidden and self.target_hidden != self.hidden:
            raise UnsupportedModel(f"EAGLE3 draft on {self.target_name}: target_hidden_size {self.target_hidden} != "
                                   f"hidden_size {self.hidden}; that runtime sizes hidden_states_input as 3 x the "
                                   f"draft's hidden size")
        if self.target_hidden != self.hidden:
            raise UnsupportedModel(f"EAGLE3 draft: hidden_size {self.hidden} differs from the base's "
                                   f"{self.target_hidden}; such a draft reads its own token embedding, and how the "
                                   f"runtime feeds it (a draft folder has no embedding.safetensors) is not known, "
                                   f"nor can verify check it")
        vocab = int(run.spec["vocab_size"])
        head = run.logits.shape[-1] if run.logits.shape else None
        self.draft_vocab = int(cfg.get("draft_vocab_size") or head or vocab)
        if isinstance(head, int) and head != self.draft_vocab:
            raise RewriteError(f"--eagle-draft: the graph's logits have {head} columns, draft_vocab_size is "
                               f"{self.draft_vocab}")
        folders = [run.in_path.parent] + ([Path(run.options.config).parent] if run.options.config else [])
        self.d2t = read_d2t(folders, self.draft_vocab, vocab)
        ids = cfg.get("target_layer_ids") or (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        self.target_layer_ids = [int(i) for i in ids] if ids else None
        self.h = next(t for t in g.outputs if t.name == "hidden_states")
        run.report.features[self.name] = {"role": "draft", "draft_vocab_size": self.draft_vocab,
                                          "target_hidden_size": self.target_hidden,
                                          "target_layer_ids": self.target_layer_ids}

    def kept_inputs(self, run) -> list:
        if self.role != "draft":
            return []
        return [t for t in run.source.graph.inputs if t.name in DRAFT_INPUTS]

    # -- apply: tree inputs into every plugin, the selected rows, the hidden_states output
    def apply(self, run, build) -> None:
        g = build.graph
        tm = self.plan.token_major
        i32 = np.int32
        if tm:
            mask = gs.Variable("packed_attention_mask", i32, ["num_tokens", "packed_mask_width"])
            pos = gs.Variable("attention_position_ids", i32, ["num_tokens"])
            # the runtime binds these for hybrid models; pure attention leaves them dangling (§11.1)
            dangling = [gs.Variable("tree_parent_ids", i32, ["num_tokens"]),
                        gs.Variable("tree_depths", i32, ["num_tokens"]),
                        gs.Variable("valid_tree_counts", i32, ["num_sequences"])]
        else:
            mask = gs.Variable("attention_mask", i32, [B, TREE_LEN, TREE_WORDS])
            pos = gs.Variable("attention_pos_id", i32, [B, TREE_LEN])
            dangling = []
        taken = {t.name for t in g.inputs} | {t.name for t in g.outputs}
        clash = [t.name for t in [mask, pos, *dangling] if t.name in taken]
        if clash:
            raise RewriteError(f"EAGLE3: the rewritten graph already has a tensor '{clash[0]}'")
        plugins = [n for n in g.nodes if n.op == "AttentionPlugin"]
        for node in plugins:
            at = self.plan.tree_at if self.plan.tree_at >= 0 else len(node.inputs)
            if self.plan.token_major and int(node.attrs.get("enable_qk_norm", 0)):
                at += 2  # 0.11: the tree group follows the q/k-norm gammas (NVIDIA's 0.11.0 exporter compacts
                # the plugin's inputs as: 6 required, gammas, context-mask selector, tree mask and positions, ...)
            node.inputs.insert(at, mask)
            node.inputs.insert(at + 1, pos)
            node.attrs["enable_tree_attention"] = 1
        em_prefix = "eagle3"
        logits = next(t for t in g.outputs if t.name == "logits")
        presents = [t for t in g.outputs if t is not logits]
        if tm:
            select = next(t for t in g.inputs if t.name == "logits_indices")
        else:
            select = next(t for t in g.inputs if t.name == "last_token_ids")
            select.shape = [B, "num_selected"]
            logits.shape = [B, "num_selected", logits.shape[-1]]
        fp16 = np.float16

        def node(op, inputs, attrs=None, name=None, out=None):
            out = out or gs.Variable(f"{em_prefix}/{name or op}_out", None, None)
            g.nodes.append(gs.Node(op, name=f"{em_prefix}/{name or op}", inputs=list(inputs), outputs=[out],
                                   attrs=attrs or {}))
            return out

        def axes(name, values):
            return gs.Constant(f"{em_prefix}/{name}", np.array(values, dtype=np.int64))

        if self.role == "base":
            parts = [node("Cast", [t], {"to": onnx.TensorProto.FLOAT16}, name=f"tap{i}_Cast")
                     for i, t in zip(self.layers, self.taps)]
            cat = node("Concat", parts, {"axis": -1}, name="taps_Concat")
            shape = ["num_tokens", 3 * self.hidden] if tm else [B, S, 3 * self.hidden]
            hidden = gs.Variable("hidden_states", fp16, shape)
            if tm:
                node("Squeeze", [cat, axes("taps_axes", [0])], name="taps_Squeeze", out=hidden)
            else:
                node("Identity", [cat], name="taps_Identity", out=hidden)
        else:
            h = self.h
            h.name = "draft_hidden_all_tokens"
            if tm:
                rows = node("Squeeze", [h, axes("h_axes", [0])], name="h_Squeeze")
                picked = node("Gather", [rows, select], {"axis": 0}, name="h_Gather")
                shape = ["num_logits", self.hidden]
            else:
                idx = node("Unsqueeze", [select, axes("h_axes", [-1])], name="h_Unsqueeze")
                picked = node("GatherND", [h, idx], {"batch_dims": 1}, name="h_GatherND")
                shape = [B, "num_selected", self.hidden]
            hidden = gs.Variable("hidden_states", fp16, shape)
            node("Cast", [picked], {"to": onnx.TensorProto.FLOAT16}, name="h_Cast", out=hidden)
            # log-probs over the draft vocabulary, after the fp32 Cast (§11.2 step 4)
            logprobs = gs.Variable("logits", np.float32, list(logits.shape))
            logits.name = "logits_before_log_softmax"
            node("LogSoftmax", [logits], {"axis": -1}, name="LogSoftmax", out=logprobs)
            logits = logprobs
            for t in [t for t in g.inputs if t.name in DRAFT_INPUTS]:
                width = t.shape[-1]
                t.dtype = fp16
                if tm:  # token-major: [T, X] in, the body's [1, T, X] by Unsqueeze
                    flat = gs.Variable(t.name, fp16, ["num_tokens", width])
                    t.name, t.shape = f"{t.name}_batch_major", [1, "num_tokens", width]
                    node("Unsqueeze", [flat, axes(f"{flat.name}_axes", [0])], name=f"{flat.name}_Unsqueeze", out=t)
                    g.inputs[g.inputs.index(t)] = flat
                else:
                    t.shape = [B, S, width]
        g.inputs = list(g.inputs) + [mask, pos, *dangling]
        g.outputs = [logits, hidden, *presents]
        if self.role == "base":
            run.report.features[self.name]["plugins"] = len(plugins)

    def config(self, run, cfg: dict) -> None:
        keys = self.plan.config_keys
        if self.role == "base":
            if "0.7" in keys:
                cfg["model_type"] = "eagle3_base"
            if "0.8" in keys:
                cfg.update(spec_decode_type="eagle3", engine_role="base")
            cfg["eagle_hidden_state_layers"] = list(self.layers)
            return
        if "0.7" in keys:
            cfg["model_type"] = "eagle3_draft"
        if "0.8" in keys:
            cfg.update(spec_decode_type="eagle3", engine_role="draft")
        cfg["draft_vocab_size"] = self.draft_vocab
        cfg["base_model_hidden_size"] = 3 * self.target_hidden
        if self.plan.eagle3_config:
            cfg["eagle3_config"] = {"target_layer_ids": self.target_layer_ids, "num_target_layers": 3}
        if self.target_layer_ids:
            cfg["target_layer_ids"] = list(self.target_layer_ids)

    def files(self, run, out_dir) -> list[str]:
        if self.role != "draft":
            return []
        from safetensors.numpy import save_file

        save_file({"d2t": np.ascontiguousarray(self.d2t, dtype=np.int32)}, str(Path(out_dir) / D2T_FILE))
        return [D2T_FILE]
