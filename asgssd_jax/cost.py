"""Parameter and MAC counts, in the paper's convention.

MACs ("FLOPs" in the paper) are multiplications of convolutions and dense/dot products per
example: ``(C_in / groups) * k_h * k_w * C_out * H_out * W_out`` for a convolution and
``in * out`` for a dense layer. Pools, normalisation, activations, adds and concats cost 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax

from asgssd_jax.trace import Op, Program, trace_program

__all__ = ["count_macs", "count_params", "op_macs", "program_macs"]


def count_params(tree: Any) -> int:
    """Number of scalars in a parameter tree.

    A linen/NNX variables dict is counted by its ``params`` collection only (BatchNorm running
    statistics are not parameters); any other tree by all its array leaves. Objects with a
    ``variables`` attribute (a :class:`~asgssd_jax.surgery.SubNetwork`) count those.
    """
    if hasattr(tree, "variables") and not isinstance(tree, Mapping):
        tree = tree.variables
    if isinstance(tree, Mapping) and "params" in tree:
        tree = tree["params"]
    return int(sum(math.prod(getattr(x, "shape", ())) for x in jax.tree_util.tree_leaves(tree)))


def op_macs(op: Op, program: Program) -> int:
    """Multiplications of one conv/dot op for the whole traced batch (0 for other ops)."""
    name = op.name
    if name == "conv_general_dilated":
        out_size = math.prod(program.shape(op.outvars[0]))
        rhs = op.invars[1]
        rhs_shape = program.shape(rhs) if isinstance(rhs, int) else tuple(rhs.aval.shape)
        spec = op.params["dimension_numbers"].rhs_spec  # (out, in, spatial...)
        per_out = rhs_shape[spec[1]] * math.prod(rhs_shape[d] for d in spec[2:])
        return out_size * per_out
    if name == "dot_general":
        (lhs_contract, _), _ = op.params["dimension_numbers"]
        lhs = op.invars[0]
        lhs_shape = program.shape(lhs) if isinstance(lhs, int) else tuple(lhs.aval.shape)
        out_size = math.prod(program.shape(op.outvars[0]))
        return out_size * math.prod(lhs_shape[d] for d in lhs_contract)
    if name in ("scan", "while", "cond"):
        return _control_flow_macs(op)
    return 0


def _control_flow_macs(op: Op) -> int:
    # Bodies are closed jaxprs; count them with a throwaway flat program.
    from asgssd_jax.program import _flatten

    def body_macs(closed) -> int:
        prog = _flatten(closed, 0, None)
        return sum(op_macs(o, prog) for o in prog.ops)

    if op.name == "scan":
        return op.params["length"] * body_macs(op.params["jaxpr"])
    if op.name == "while":  # trip count unknown: one iteration
        return body_macs(op.params["body_jaxpr"])
    return max(body_macs(b) for b in op.params["branches"])


def _batch_size(program: Program) -> int:
    shapes = [program.shape(v) for v in program.arg_vars]
    return shapes[0][0] if shapes and shapes[0] else 1


def program_macs(program: Program, ops: Any = None) -> float:
    """Per-example MACs of ``ops`` (indices; default all) of a traced program."""
    ops = range(len(program.ops)) if ops is None else ops
    total = sum(op_macs(program.ops[i], program) for i in ops)
    return total / _batch_size(program)


def count_macs(apply_fn: Callable[..., Any], variables: Any, *args: Any, **kwargs: Any) -> int:
    """Per-example MACs of ``apply_fn(variables, *args, **kwargs)`` (batch = first axis of the
    first input); the paper's "FLOPs"."""
    program, _, _ = trace_program(apply_fn, variables, *args, **kwargs)
    return int(round(program_macs(program)))
