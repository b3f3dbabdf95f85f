"""A cheap stand-in for torch.onnx's decomposition step, used when it is exact.

`torch.onnx.export(dynamo=True)` captures the model with torch.export (training IR), then
`run_decompositions` retraces the whole program with fake tensors and symbolic shapes only to lower it
to core aten: 23 of the ~45 s of a 24-layer 0.5B export, mostly sympy. A decoder's training IR is
already almost all ops torchlib translates directly (linear, sdpa, embedding, mul, ...); the few it
lacks are spellings of ops it has (`aten.to.*` is `_to_copy`, `aten.__and__` is `bitwise_and`). The
retrace also drops reshapes to the shape a tensor already has (transformers' sdpa path has one per
layer); they are dropped here too wherever the symbolic shapes prove it. The graph is then torch's own,
op for op, less at most such no-op reshapes (tests/test_export_route.py).

`lower(program, registry)` renames those in place and returns True, or touches nothing and returns
False when the graph holds anything else (a mutating op, a higher-order op, a nested graph, an op
without a translation): then the caller runs the real decomposition. The numbers are checked like every
export: the rewrite's tests verify each family against transformers.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_ASSERTIONS = ("sym_constrain_range_for_size", "_assert_async", "_assert_scalar", "_assert_tensor_metadata")


def lower(program, registry) -> bool:
    """Rename the training-IR ops torchlib lacks to the core ops they are; False if that is not enough."""
    import torch

    gm = program.graph_module
    if any(isinstance(m, torch.fx.GraphModule) for name, m in gm.named_modules() if name):
        return _unsupported("a nested graph (control flow or a higher-order op)")
    plan = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if not isinstance(target, torch._ops.OpOverload):
            if target.__module__ == "_operator" or getattr(target, "__name__", "").startswith("sym_"):
                continue  # symbolic-int arithmetic (operator.mul on SymInts), which the translator handles
            return _unsupported(f"{target}")
        if target._schema.is_mutable:
            return _unsupported(f"the mutating op {target}")
        if target.namespace == "aten" and target._schema.name.split("::")[-1] in _ASSERTIONS:
            continue  # removed before translation
        if registry.is_registered(target):
            continue
        replacement = _core_op(node, target)
        if replacement is None or (replacement[0] is not None and not registry.is_registered(replacement[0])):
            return _unsupported(f"{target}, which torchlib does not translate")
        plan.append((node, *replacement))
    # Only now: a refusal above leaves the program as it was. Renames first, while the planned args exist.
    for node, target, args, kwargs in plan:
        if target is not None:
            node.target, node.args, node.kwargs = target, args, kwargs
    for node, target, _, _ in plan:
        if target is None:  # the input itself, as torch's step makes it (keeps e.g. inv_freq's name)
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    reshapes = (torch.ops.aten.reshape.default, torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in reshapes and _same_shape(node.args[0], node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.recompile()
    return True


def _same_shape(a, b) -> bool:
    """Whether fx nodes a and b are provably of one shape (symbolic dims included)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    va, vb = getattr(a, "meta", {}).get("val"), getattr(b, "meta", {}).get("val")
    if va is None or vb is None or not hasattr(va, "shape") or not hasattr(vb, "shape") or va.ndim != vb.ndim:
        return False
    return all(statically_known_true(x == y) for x, y in zip(va.shape, vb.shape))


def _core_op(node, target):
    """(core op, args, kwargs) computing what `node` computes, (None, (), {}) when that is its input, or
    None when there is no such op."""
    import torch

    aten = torch.ops.aten
    name, overload = target._schema.name.split("::")[-1], target._overloadname
    x = node.args[0] if node.args else None
    if name == "to":
        # to.dtype(x, dtype, ...), to.device(x, device, dtype, ...), to.dtype_layout(x, *, dtype, layout, device)
        # All run on one device here, so each is a cast (or nothing when dtype is None); to.other takes
        # its dtype from a tensor and is left to the decomposition.
        if overload == "dtype":
            dtype = node.args[1] if len(node.args) > 1 else node.kwargs.get("dtype")
        elif overload == "device":
            dtype = node.args[2] if len(node.args) > 2 else node.kwargs.get("dtype")
        elif overload == "dtype_layout":
            dtype = node.kwargs.get("dtype")
        else:
            return None
        if node.kwargs.get("memory_format") not in (None, torch.preserve_format):
            return None
        val = getattr(x, "meta", {}).get("val")
        if dtype is None or (val is not None and getattr(val, "dtype", None) == dtype):
            return None, (), {}  # no change: `to` returns its input
        return aten._to_copy.default, (x,), {"dtype": dtype}
    if name.startswith("__") and name.endswith("__") and name.strip("_") in ("and", "or", "xor"):
        op = getattr(getattr(aten, f"bitwise_{name.strip('_')}", None), overload, None)
        return (op, node.args, node.kwargs) if op is not None else None
    return None


def _unsupported(what: str) -> bool:
    log.debug("export: full decomposition (the graph has %s)", what)
    return False


def needs_type_promotion(gm) -> bool:
    """Whether torch.onnx's InsertTypePromotion pass would change anything in `gm`.

    That pass re-runs every node in fake mode only to keep metadata right after inserting casts: ~3 s
    on a 24-layer 0.5B model, and decoders rarely need one cast. This asks torch's own promotion rules
    about each node from the metadata already there; any doubt answers True (the pass runs).
    """
    import torch

    try:
        from torch.onnx._internal.fx import type_utils
        from torch.onnx._internal.fx.passes import type_promotion as tp

        table = tp.TypePromotionTable()
        for node in gm.graph.nodes:
            if node.op != "call_function" or (rule := tp.get_type_promotion_rule(node, table)) is None:
                continue
            val = lambda n: n.meta["val"]  # noqa: E731 - KeyError on a node without metadata: doubt
            args = torch.fx.node.map_arg(node.args, val)
            kwargs = torch.fx.node.map_arg(node.kwargs, val)
            info = rule.preview_type_promotion(args, kwargs)
            pairs = [(a, v, info.args_dtypes.get(i)) for i, (a, v) in enumerate(zip(node.args, args))]
            pairs += [(node.kwargs[k], kwargs[k], info.kwargs_dtypes.get(k)) for k in node.kwargs]
            if any(_would_cast(a, v, dtype, type_utils) for a, v, dtype in pairs):
                return True
        return False
    except Exception as exc:  # noqa: BLE001 - any surprise: let torch's pass decide
        log.debug("export: type promotion check failed (%s); running the pass", exc)
        return True


def _would_cast(arg, val, dtype, type_utils) -> bool:
    """Mirror of _TypePromotionInterpreter._maybe_promote_arg: would it insert a cast for this argument?"""
    import torch

    if dtype is None:
        return False
    if isinstance(arg, (tuple, list)):
        return any(_would_cast(a, v, dtype, type_utils) for a, v in zip(arg, val))
    if isinstance(arg, torch.fx.Node):
        if isinstance(val, torch.Tensor):
            return val.dtype != dtype
        if type_utils.is_torch_symbolic_type(val):
            return type_utils.from_scalar_type_to_torch_dtype(type(val)) != dtype
        raise TypeError(f"unexpected value {type(val)}")
    equivalent = type_utils.from_scalar_type_to_torch_dtype(type(arg))
    if equivalent is None:
        raise TypeError(f"unexpected argument {type(arg)}")
    return equivalent != dtype
