"""Running a plan: the original ``apply_fn`` re-traced at the input's shape, rewritten.

The plan is expressed per operation and per variable id, so it carries over to a re-trace at
any input shape with the same program structure (the same ``signature``). The kept primitives
are bound again with their rewritten shapes; folded constants are broadcast to the current
shapes and computed constants are re-run from their stored inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from asgssd_jax.surgery.affiliated import accumulating_params, low_precision
from asgssd_jax.surgery.plan import ModePlan, SubNetworkPlan, SurgeryError, bind_kwargs
from asgssd_jax.surgery.planner import signature
from asgssd_jax.surgery.remove import is_literal
from asgssd_jax.trace import Program, TraceError, trace_program

__all__ = ["Runner", "runner_for"]


def _spec(a: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(a), getattr(a, "dtype", None) or jnp.result_type(a))


def runner_for(plan: SubNetworkPlan, apply_fn: Callable[..., Any], static: Mapping[str, Any],
               dynamic: Mapping[str, Any], args: Sequence[Any]) -> Runner:
    """The rewritten program for these keyword arguments and inputs shaped like ``args``
    (cached on the plan)."""
    inputs = (*args, dict(dynamic)) if dynamic else tuple(args)
    leaves, tree = jax.tree_util.tree_flatten(inputs)
    specs = tuple(_spec(a) for a in leaves)
    names = tuple(sorted(dynamic))
    key = (id(apply_fn), repr(sorted(static.items())), names, tree,
           tuple((s.shape, s.dtype) for s in specs))
    hit = plan._cache.get(key)
    if hit is not None:
        return hit
    candidates = plan.modes_for(static, names)
    call_static = dict(static)
    if candidates[0].mutable:
        call_static["mutable"] = list(candidates[0].mutable)
    fn = bind_kwargs(apply_fn, call_static, names)
    arg_specs = jax.tree_util.tree_unflatten(tree, specs)
    try:
        program, _, treedef = trace_program(fn, plan.full_spec(), *arg_specs)
    except TraceError as e:
        raise SurgeryError(f"the original apply_fn could not be traced for the sub-network: "
                           f"{e}") from e
    if treedef != plan.treedef:
        raise SurgeryError("apply_fn's variables differ from the ones the sub-network was "
                           "built from; pass the original model's apply")
    sig = signature(program)
    matching = [m for m in candidates if m.signature == sig and m.num_ops == len(program.ops)]
    if not matching:
        shapes = ", ".join(str(s.shape) for s in specs)
        planned = " or ".join(str(m.num_ops) for m in candidates)
        raise SurgeryError(
            f"the program of apply_fn for inputs of shape {shapes} differs from the ones the "
            f"sub-network was planned on ({len(program.ops)} vs {planned} operations). Use "
            "the same model definition (and configuration) the sub-network was built from; "
            "a model whose operations change with the input shape beyond batch size 1 vs "
            "larger is not supported")
    run = Runner(program, matching[0], plan)
    plan._cache[key] = run
    return run


class Runner:
    """Evaluates the rewritten program: re-binds the kept primitives with rewritten shapes."""

    def __init__(self, program: Program, mode: ModePlan, plan: SubNetworkPlan):
        self.program = program
        self.mode = mode
        self.out_tree = program.out_tree
        masks = mode.masks

        def new_shape(v: int) -> tuple:
            shape = list(program.shape(v))
            m = masks.get(v)
            if m is not None:
                axis, size, keep = m
                if shape[axis] != size:
                    raise SurgeryError(
                        f"a sliced axis has size {shape[axis]} at this input shape but {size} "
                        "when planned: slicing along an input-dependent axis is not supported")
                shape[axis] = len(keep)
            return tuple(shape)

        self.leaf_vars = [program.leaf_vars[i] for i in plan.kept]
        self.consts = {v: (c, new_shape(v), program.avals[v].dtype)
                       for v, c in mode.consts.items()}
        self.computed = [(v, [program.ops[i] for i in ops], masks.get(v))
                         for v, ops in mode.computed.items()]
        self.const_inputs = {v: (c, program.shape(v), program.avals[v].dtype)
                             for v, c in mode.const_inputs.items()}
        self.static_consts = dict(program.consts)
        steps = []
        for i in mode.ops:
            op = program.ops[i]
            if i in mode.alias:
                src, neg = mode.alias[i]
                steps.append((op.name_stack, None, ((src, None),), neg, op.outvars, None))
                continue
            drop = mode.dropped.get(i, ())
            reads = tuple((v, mode.gathers.get((i, k)))
                          for k, v in enumerate(op.invars) if k not in drop)
            params = _rewrite_params(op, program, masks, new_shape)
            offset = mode.offsets.get(i)
            if offset is not None:
                dtype = program.avals[op.outvars[0]].dtype
                if low_precision(dtype):  # accumulate in float32, add, round once
                    params = accumulating_params(op, dtype, params)
                offset = (offset, new_shape(op.outvars[0]), dtype)
            steps.append((op.name_stack, op.primitive, reads, params, op.outvars, offset))
        self.steps = steps
        self.outputs = [(program.outvars[p], mode.gathers.get((-1, p))) for p in mode.outputs]

    def _computed_constants(self, env: dict[int, Any]) -> None:
        for v, ops, mask in self.computed:
            local = {}
            for x, (c, shape, dtype) in self.const_inputs.items():
                local[x] = jnp.broadcast_to(jnp.asarray(c, dtype), shape)
            local.update(self.static_consts)
            for op in ops:
                ins = [x.val if is_literal(x) else local[x] for x in op.invars]
                outs = op.primitive.bind(*ins, **op.params)
                local.update(zip(op.outvars, outs if op.primitive.multiple_results else [outs]))
            val = local[v]
            if mask is not None:
                val = jnp.take(val, mask[2], axis=mask[0])
            env[v] = val

    def __call__(self, leaves: Sequence[Any], inputs: Sequence[Any]) -> list[Any]:
        env: dict[int, Any] = dict(self.static_consts)
        env.update(zip(self.leaf_vars, leaves))
        env.update(zip(self.program.arg_vars, jax.tree_util.tree_leaves(inputs)))
        for v, (c, shape, dtype) in self.consts.items():
            env[v] = jnp.broadcast_to(jnp.asarray(c, dtype), shape)
        self._computed_constants(env)

        def read(x, gather):
            val = x.val if is_literal(x) else env[x]
            if gather is not None:
                axis, _, keep = gather
                if np.shape(val)[axis] != len(keep):
                    val = jnp.take(val, keep, axis=axis)
            return val

        current = None
        scope = None
        try:
            for stack, prim, reads, params, outvars, offset in self.steps:
                if stack != current:
                    if scope is not None:
                        scope.__exit__(None, None, None)
                        scope = None
                    current = stack
                    if stack:
                        scope = jax.named_scope(stack)
                        scope.__enter__()
                ins = [read(x, g) for x, g in reads]
                if prim is None:  # a bypassed joint
                    env[outvars[0]] = lax.neg(ins[0]) if params else ins[0]
                    continue
                outs = prim.bind(*ins, **params)
                if not prim.multiple_results:
                    outs = [outs]
                if offset is not None:  # what dropped constant channels contributed
                    c, shape, dtype = offset
                    total = outs[0] + jnp.broadcast_to(jnp.asarray(c, outs[0].dtype), shape)
                    outs = [total.astype(dtype)]
                env.update(zip(outvars, outs))
        finally:
            if scope is not None:
                scope.__exit__(None, None, None)
        return [read(x, g) for x, g in self.outputs]


def _rewrite_params(op, program: Program, masks, new_shape) -> dict:
    """``op``'s parameters for the sliced shapes of its operands and results."""
    params = op.params
    outs_masked = any(o in masks for o in op.outvars)
    ins_masked = any(isinstance(v, int) and v in masks for v in op.invars)
    if not (outs_masked or ins_masked):
        return params
    name = op.name
    params = dict(params)
    if name == "reshape":
        if params.get("dimensions") is not None:
            raise SurgeryError("cannot slice through a reshape with 'dimensions'")
        params["new_sizes"] = new_shape(op.outvars[0])
    elif name == "slice" and isinstance(op.invars[0], int) and op.invars[0] in masks:
        # one layer of a stacked leaf whose removed layers are dropped: its new position
        axis, _, keep = masks[op.invars[0]]
        start, limit = list(params["start_indices"]), list(params["limit_indices"])
        stride = (params["strides"] or (1,) * len(start))[axis]
        pos = np.searchsorted(keep, np.arange(start[axis], limit[axis], stride))
        if (np.any(pos >= len(keep)) or np.any(keep[np.minimum(pos, len(keep) - 1)]
                                                != np.arange(start[axis], limit[axis], stride))
                or np.any(np.diff(pos) != 1)):
            raise SurgeryError("a slice reads entries of a leaf that the sub-network dropped")
        start[axis], limit[axis] = int(pos[0]), int(pos[-1]) + 1
        params["start_indices"], params["limit_indices"] = tuple(start), tuple(limit)
        if params["strides"] is not None:
            strides = list(params["strides"])
            strides[axis] = 1
            params["strides"] = tuple(strides)
    elif name in ("broadcast_in_dim", "iota"):
        params["shape"] = new_shape(op.outvars[0])
    elif name == "conv_general_dilated":
        lhs = op.invars[0]
        groups = params["feature_group_count"]
        if groups > 1 and isinstance(lhs, int) and lhs in masks:
            axis = params["dimension_numbers"].lhs_spec[1]
            old, new = program.shape(lhs)[axis], new_shape(lhs)[axis]
            if groups != old:
                raise SurgeryError("cannot slice the input channels of a grouped convolution")
            params["feature_group_count"] = new
    return params
