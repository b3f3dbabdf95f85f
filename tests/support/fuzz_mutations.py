"""Deterministic single-point mutations of a baseline ONNX proto, for tests/test_fuzz.py.

Each mutator takes (model, rng) and returns a short description, or None when it found nothing to
mutate. Most picks come from the attention region (nodes near a Softmax: RoPE, mask, scale, k^T,
repeat_kv, P·V), where a wrong fusion would hide; the rest from anywhere in the graph.
"""

from __future__ import annotations

import random
from collections import deque

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SMALL = 256  # constants up to this many elements may be perturbed


class Graph:
    """Index of a ModelProto: producers, consumers, tensor types, the attention region."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.nodes = list(g.node)
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.inits = {t.name: t for t in g.initializer}
        self.order = {id(n): k for k, n in enumerate(self.nodes)}
        self.types: dict[str, tuple[int, int | None]] = {}
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            tt = vi.type.tensor_type
            self.types[vi.name] = (tt.elem_type, len(tt.shape.dim) if tt.HasField("shape") else None)
        for t in g.initializer:
            self.types[t.name] = (t.data_type, len(t.dims))
        self.hot = self._attention_region()

    def _attention_region(self, back: int = 16, forward: int = 4) -> list:
        seen: dict[int, object] = {}
        softmax = [n for n in self.nodes if n.op_type == "Softmax"]
        queue = deque((n, 0) for n in softmax)
        while queue:
            n, d = queue.popleft()
            if id(n) in seen or d > back:
                continue
            seen[id(n)] = n
            queue.extend((self.producer[i], d + 1) for i in n.input if i in self.producer)
        queue = deque((n, 0) for n in softmax)
        while queue:
            n, d = queue.popleft()
            if d > forward:
                continue
            seen[id(n)] = n
            queue.extend((c, d + 1) for o in n.output for c in self.consumers.get(o, []))
        # the RoPE table: everything downstream of Cos/Sin up to the rotate_half Adds is within reach
        # of the backward walk; the positions/inv_freq side feeds Cos/Sin
        for n in self.nodes:
            if n.op_type in ("Cos", "Sin"):
                stack = [n]
                while stack:
                    m = stack.pop()
                    if id(m) in seen and m is not n:
                        continue
                    seen[id(m)] = m
                    stack.extend(self.producer[i] for i in m.input if i in self.producer)
        return sorted(seen.values(), key=lambda n: self.order[id(n)])

    def pick_node(self, rng: random.Random, pred=lambda n: True, hot: float = 0.85):
        pool = [n for n in (self.hot if rng.random() < hot else self.nodes) if pred(n)]
        pool = pool or [n for n in self.nodes if pred(n)]
        return rng.choice(pool) if pool else None

    def const_value(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        p = self.producer.get(name)
        if p is not None and p.op_type == "Constant":
            for a in p.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def set_const(self, node, index: int, value: np.ndarray, rng: random.Random, tag: str) -> None:
        """Give `node.input[index]` a new constant value; shared constants are either changed for every
        user or cloned for this one (both happen: a per-use change breaks symmetry between layers)."""
        name = node.input[index]
        shared = len(self.consumers.get(name, [])) > 1
        if shared and rng.random() < 0.5 or name not in self.inits:
            new = f"{name}__{tag}"
            self.model.graph.initializer.append(numpy_helper.from_array(value, new))
            node.input[index] = new
        else:
            self.inits[name].CopyFrom(numpy_helper.from_array(value, name))


def _perturb(v: np.ndarray, rng: random.Random) -> np.ndarray:
    v = v.copy()
    flat = v.reshape(-1)
    k = rng.randrange(flat.size) if flat.size else 0
    if flat.size == 0:
        return v
    if np.issubdtype(v.dtype, np.floating):
        choice = rng.choice(["scale", "neg", "zero", "tiny"])
        if choice == "scale":
            flat[k] = flat[k] * rng.choice([0.5, 2.0, 1.1, 0.9, 8.0])
        elif choice == "neg":
            flat[k] = -flat[k]
        elif choice == "zero":
            flat[k] = 0
        else:
            flat[k] = flat[k] * (1 + 1e-3)
    elif np.issubdtype(v.dtype, np.integer):
        nudge = rng.random() < 0.7
        flat[k] = flat[k] + rng.choice([-2, -1, 1, 2]) if nudge else rng.choice([-1, 0, 1, 2, 4, 8, 1 << 30])
    elif v.dtype == np.bool_:
        flat[k] = not flat[k]
    return v


def _small_const_inputs(g: Graph, node) -> list[int]:
    out = []
    for i, name in enumerate(node.input):
        v = g.const_value(name) if name else None
        if v is not None and v.size <= SMALL:
            out.append(i)
    return out


# ------------------------------------------------------------------ mutators


def remove_node(g: Graph, rng: random.Random):
    """Drop a node, its consumers reading its first input instead (a skipped Neg, Cast, Transpose, ...)."""
    node = g.pick_node(rng, lambda n: len(n.input) >= 1 and n.input[0] and len(n.output) == 1
                       and n.output[0] not in {o.name for o in g.model.graph.output})
    if node is None:
        return None
    out, src = node.output[0], node.input[0]
    for c in g.consumers.get(out, []):
        for i, name in enumerate(c.input):
            if name == out:
                c.input[i] = src
    g.model.graph.node.remove(node)
    return f"remove {node.op_type} '{node.name}'"


def rewire_input(g: Graph, rng: random.Random):
    """Feed a node input from another earlier tensor of the same element type and rank."""
    node = g.pick_node(rng, lambda n: any(i and i not in g.inits for i in n.input))
    if node is None:
        return None
    idx = [i for i, name in enumerate(node.input) if name and name not in g.inits]
    i = rng.choice(idx)
    want = g.types.get(node.input[i])
    if want is None:
        return None
    pos = g.order[id(node)]
    cands = [t for t, ty in g.types.items() if ty == want and t != node.input[i] and t not in g.inits
             and (t not in g.producer or g.order[id(g.producer[t])] < pos)]
    if not cands:
        return None
    new = rng.choice(sorted(cands))
    old = node.input[i]
    node.input[i] = new
    return f"rewire {node.op_type} '{node.name}' input {i}: {old} -> {new}"


def perturb_constant(g: Graph, rng: random.Random):
    """Change one element of a small constant operand (slice bounds, shape targets, scales, axes, ...)."""
    node = g.pick_node(rng, lambda n: bool(_small_const_inputs(g, n)))
    if node is None:
        return None
    i = rng.choice(_small_const_inputs(g, node))
    v = g.const_value(node.input[i])
    nv = _perturb(v, rng)
    g.set_const(node, i, nv, rng, "perturbed")
    before, after = v.reshape(-1)[:8].tolist(), nv.reshape(-1)[:8].tolist()
    return f"constant {node.op_type} '{node.name}' input {i}: {before} -> {after}"


def perturb_inv_freq(g: Graph, rng: random.Random):
    """Change RoPE frequencies: one value, all of them (another theta), or llama3-like high ones."""
    names = [n for n in g.inits if "inv_freq" in n]
    if not names:
        return None
    name = names[0]
    v = numpy_helper.to_array(g.inits[name]).astype(np.float32)
    kind = rng.choice(["one", "theta", "tail", "reverse"])
    nv = v.copy()
    if kind == "one":
        nv[rng.randrange(v.size)] *= rng.choice([0.5, 2.0, 1.01])
    elif kind == "theta":
        theta = rng.choice([500.0, 1e6, 5e5])
        nv = (1.0 / theta ** (np.arange(0, 2 * v.size, 2, dtype=np.float32) / (2 * v.size))).astype(np.float32)
    elif kind == "tail":
        nv[v.size // 2:] /= 8.0
    else:
        nv = nv[::-1].copy()
    users = g.consumers.get(name, [])
    if len(users) > 1 and rng.random() < 0.5:  # only one user (e.g. one layer's table) sees the change
        user = rng.choice(users)
        g.set_const(user, list(user.input).index(name), nv, rng, "inv")
    else:
        g.inits[name].CopyFrom(numpy_helper.from_array(nv, name))
    return f"inv_freq {kind}: {v.tolist()} -> {nv.tolist()}"


def perturb_scale(g: Graph, rng: random.Random):
    """Change a scalar float multiplier or divisor near attention (the softmax scale, sqrt(scale) halves)."""
    def scalar_operand(n):
        return n.op_type in ("Mul", "Div") and any(
            (v := g.const_value(i)) is not None and v.size == 1 and np.issubdtype(v.dtype, np.floating)
            for i in n.input)

    node = g.pick_node(rng, scalar_operand, hot=1.0)
    if node is None:
        return None
    i = next(k for k, name in enumerate(node.input) if (v := g.const_value(name)) is not None and v.size == 1
             and np.issubdtype(v.dtype, np.floating))
    v = g.const_value(node.input[i])
    nv = (v * rng.choice([0.5, 2.0, -1.0, 0.0, 1.0001])).astype(v.dtype)
    g.set_const(node, i, nv, rng, "scale")
    return f"scale {node.op_type} '{node.name}': {float(v.reshape(-1)[0])} -> {float(nv.reshape(-1)[0])}"


def reshape_target(g: Graph, rng: random.Random):
    """Change a constant Reshape target: swap two dims, or set one to -1, 0, 1 or twice its value."""
    node = g.pick_node(rng, lambda n: n.op_type == "Reshape" and g.const_value(n.input[1]) is not None)
    if node is None:
        return None
    v = g.const_value(node.input[1]).copy()
    if v.size >= 2 and rng.random() < 0.5:
        a, b = rng.sample(range(v.size), 2)
        v[a], v[b] = v[b], v[a]
    else:
        v[rng.randrange(v.size)] = rng.choice([-1, 0, 1, 2 * int(v.max()) or 2])
    g.set_const(node, 1, v, rng, "shape")
    return f"reshape '{node.name}' target -> {v.tolist()}"


def swap_inputs(g: Graph, rng: random.Random):
    """Swap two inputs: Slice starts/ends, Concat halves, Sub/Div/MatMul operands, Where branches."""
    node = g.pick_node(rng, lambda n: len([i for i in n.input if i]) >= 2 and n.op_type not in ("Add", "Mul"))
    if node is None:
        return None
    if node.op_type == "Slice" and len(node.input) >= 3:
        a, b = 1, 2
    elif node.op_type == "Where":
        a, b = 1, 2
    else:
        a, b = rng.sample(range(len(node.input)), 2)
    ins = list(node.input)
    ins[a], ins[b] = ins[b], ins[a]
    del node.input[:]
    node.input.extend(ins)
    return f"swap inputs {a},{b} of {node.op_type} '{node.name}'"


_ATTRS = {
    "Transpose": "perm", "Softmax": "axis", "Concat": "axis", "Gather": "axis", "Unsqueeze": "axes",
    "ReduceMean": "keepdims", "Cast": "to", "Expand": None, "Squeeze": "axes", "Slice": None,
}


def change_attribute(g: Graph, rng: random.Random):
    """Change an attribute: a Transpose perm, a Softmax/Concat/Gather axis, a Cast target type."""
    node = g.pick_node(rng, lambda n: any(a.name in ("perm", "axis", "to", "axes") for a in n.attribute))
    if node is None:
        return None
    attr = rng.choice([a for a in node.attribute if a.name in ("perm", "axis", "to", "axes")])
    old = helper.get_attribute_value(attr)
    if attr.name == "perm":
        new = list(old)
        while new == list(old) and len(new) > 1:
            rng.shuffle(new)
    elif attr.name == "to":
        new = rng.choice([TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64, TensorProto.DOUBLE])
    elif attr.name == "axes":
        new = [a + rng.choice([-1, 1]) for a in old]
    else:
        new = old + rng.choice([-2, -1, 1])
    node.attribute.remove(attr)
    node.attribute.append(helper.make_attribute(attr.name, new))
    return f"attribute {node.op_type} '{node.name}'.{attr.name}: {old} -> {new}"


_OP_SWAPS = {"Add": "Sub", "Sub": "Add", "Mul": "Div", "Div": "Mul", "Cos": "Sin", "Sin": "Cos", "Neg": "Abs",
             "Max": "Min", "Min": "Max", "Softmax": "LogSoftmax", "Sqrt": "Reciprocal", "Reciprocal": "Sqrt",
             "LessOrEqual": "Less", "Less": "LessOrEqual", "GreaterOrEqual": "Greater", "Greater": "GreaterOrEqual",
             "And": "Or", "Or": "And"}


def change_op(g: Graph, rng: random.Random):
    """Replace an op by a close relative with the same signature (Add/Sub, Cos/Sin, <=/<, ...)."""
    node = g.pick_node(rng, lambda n: n.op_type in _OP_SWAPS)
    if node is None:
        return None
    old = node.op_type
    node.op_type = _OP_SWAPS[old]
    return f"op {old} -> {node.op_type} '{node.name}'"


MUTATORS = [
    (remove_node, 3), (rewire_input, 3), (perturb_constant, 4), (perturb_inv_freq, 1), (perturb_scale, 2),
    (reshape_target, 2), (swap_inputs, 2), (change_attribute, 2), (change_op, 2),
]


def mutate(model: onnx.ModelProto, seed: int) -> str:
    """Apply one mutation chosen by `seed` to `model` in place; returns its description."""
    rng = random.Random(seed)
    fns, weights = zip(*MUTATORS)
    for _ in range(20):
        fn = rng.choices(fns, weights)[0]
        desc = fn(Graph(model), rng)
        if desc is not None:
            return f"{fn.__name__}: {desc}"
    raise RuntimeError(f"seed {seed}: no mutation applied")
