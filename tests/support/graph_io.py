"""Shared by the contract tests: a graph's inputs/outputs as name -> (elem_type, dims)."""


def io_signature(value_infos) -> dict:
    out = {}
    for vi in value_infos:
        t = vi.type.tensor_type
        out[vi.name] = (t.elem_type, [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim])
    return out
