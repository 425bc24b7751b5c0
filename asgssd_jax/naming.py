"""Names a researcher reads for trace-graph vertices: ``Conv``, ``BatchNorm``, ``ReLU``,
``AvgPool``, ``Dense``, ``Softmax`` instead of primitive chains (``Max``, ``SumPool-div``).
Used by the pictures (:mod:`asgssd_jax.viz`) and by ``SearchSpace.summary()``."""

from __future__ import annotations

from asgssd_jax.trace import TraceGraph

__all__ = ["operation_name"]

# Runs of primitives -> the operation a researcher reads; matched left to right, longest first.
_RUNS: list[tuple[tuple[str, ...], str]] = sorted([
    (("conv_general_dilated", "add"), "Conv"),
    (("conv_general_dilated",), "Conv"),
    (("dot_general", "add"), "Dense"),
    (("dot_general",), "MatMul"),
    (("reduce_window_sum", "div"), "AvgPool"),
    (("reduce_window_sum",), "SumPool"),
    (("reduce_window_max",), "MaxPool"),
    (("reduce_window",), "Pool"),
    (("reduce_sum", "div"), "Mean"),
    (("logistic", "mul"), "SiLU"),
    (("logistic",), "Sigmoid"),
    (("concatenate",), "Concat"),
    (("add",), "Add"),
    (("add_any",), "Add"),
    (("sub",), "Sub"),
    (("mul",), "Mul"),
    (("div",), "Div"),
    (("tanh",), "Tanh"),
    (("exp",), "Exp"),
], key=lambda r: -len(r[0]))
# shape bookkeeping that says nothing about the operation
_SILENT = {"reshape", "broadcast_in_dim", "squeeze", "expand_dims", "convert_element_type",
           "transpose", "copy", "copy_p", "stop_gradient"}


def operation_name(trace: TraceGraph, v: int) -> str:
    """What vertex ``v`` computes, in the words of a paper: ``Conv``, ``BatchNorm``, ``ReLU``,
    ``AvgPool``, ``Dense``, ``Add, ReLU, Mean``, ... (primitive names where no pattern fits)."""
    vert = trace.vertices[v]
    if vert.kind != "op":
        return vert.kind
    prims = [p for p in vert.primitives if p not in _SILENT] or list(vert.primitives)
    paths = [trace.unit_path(u) for u in vert.leaves]
    if any(p.startswith("batch_stats/") for p in paths):
        return "BatchNorm"
    if "rsqrt" in prims and ("reduce_sum" in prims or "reduce_mean" in prims):
        return "LayerNorm" if not any(p in prims for p in ("conv_general_dilated",
                                                           "dot_general")) else "Norm"
    if "erf" in prims:
        return "GELU"
    if {"exp", "reduce_max", "reduce_sum", "div"} <= set(prims):
        return "Softmax"
    ops = [trace.program.ops[i] for i in vert.ops]
    ops = [op for op in ops if op.name not in _SILENT] or ops
    names: list[str] = []
    i = 0
    while i < len(ops):
        if ops[i].name == "max":
            names.append("ReLU" if _is_relu(trace, ops[i]) else "Max")
            i += 1
            continue
        for run, name in _RUNS:
            if tuple(op.name for op in ops[i:i + len(run)]) == run:
                names.append(name)
                i += len(run)
                break
        else:
            names.append(ops[i].name)
            i += 1
    deduped = [n for k, n in enumerate(names) if k == 0 or n != names[k - 1]]
    if len(deduped) > 4:
        deduped = deduped[:4] + ["..."]
    return ", ".join(deduped)


def _is_relu(trace: TraceGraph, op) -> bool:
    """``max(x, 0)`` with one data operand."""
    from jax.extend import core as jex_core

    data = op.data_invars(trace.program.data)
    if len(data) != 1:
        return False
    other = [v for v in op.invars if not (isinstance(v, int) and v in trace.program.data)]
    for v in other:
        value = v.val if isinstance(v, jex_core.Literal) else trace.program.consts.get(v)
        try:
            if value is None or float(value) != 0.0:
                return False
        except TypeError:  # an array operand: a clamp, not a ReLU
            return False
    return True
