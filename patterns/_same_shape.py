"""Shape-keeping Reshapes after the attention core (TorchScript's sdpa writes its result back this way).

TorchScript ends the sdpa decomposition with `Reshape(P·V, [B', H, S', D])`, each symbolic entry read at
run time as `Gather(Shape(t), k)` from the output itself or from q. q and the output share B and S, so
when every entry is such a read at the same axis k, a constant equal to the static dim, or the one -1
(then fixed by the others), the Reshape returns its input unchanged; readers may look through it.
"""

from onnx_rewriter.matching import const, producer, skip


def _entries(target):
    """The 1-element parts of a Concat-built shape, or None."""
    cat = producer(target)
    if cat is None or cat.op != "Concat":
        return None
    parts = list(cat.inputs)
    if any(p.shape is None or list(p.shape) != [1] for p in parts):
        return None
    return parts


def keeps_shape(reshape, x, sources) -> bool:
    """True when `reshape` (of `x`, rank 4) provably returns x's shape; `sources` share x's dims."""
    if reshape.op != "Reshape" or reshape.inputs[0] is not x or x.shape is None or len(x.shape) != 4:
        return False
    y = reshape.outputs[0].shape
    if y is not None and list(y) == list(x.shape) and all(isinstance(d, (int, str)) for d in y):
        return True  # shape inference already proved it (dynamo exports with a KV cache)
    parts = _entries(reshape.inputs[1])
    if parts is None or len(parts) != 4:
        return False
    wildcards = 0
    for k, part in enumerate(parts):
        v = const(part)
        if v is not None:
            want = int(v.reshape(-1)[0])
            wildcards += want == -1  # one -1 is what the three others leave: x's dim
            if want != -1 and not (isinstance(x.shape[k], int) and want == x.shape[k]):
                return False
            continue
        g = producer(skip(part, ("Unsqueeze", "Cast", "Reshape")))
        if g is None or g.op != "Gather" or const(g.inputs[1]) is None:
            return False
        shp = producer(g.inputs[0])
        if shp is None or shp.op != "Shape" or shp.attrs.get("start", 0) != 0 or shp.inputs[0] not in sources:
            return False
        if int(const(g.inputs[1]).reshape(-1)[0]) != k:
            return False
    return wildcards <= 1


def readers(out, sources):
    """Nodes reading `out`, looking through shape-keeping Reshapes (Shape side branches left out)."""
    found = []
    for n in out.outputs:
        if n.op == "Shape":
            continue
        if keeps_shape(n, out, [out, *sources]):
            found += readers(n.outputs[0], sources)
        else:
            found.append(n)
    return found
