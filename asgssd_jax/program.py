"""The flat program of a network's forward pass: its jaxpr with nested calls inlined.

``trace_program(apply_fn, variables, *args, **kwargs)`` runs ``jax.make_jaxpr`` once and inlines
nested jaxprs (``jit``, ``closed_call``, ``custom_jvp_call``, ``custom_vjp_call``,
``checkpoint``) into one :class:`Program` whose values are integer ids. A ``scan`` over a static
stack (layers whose parameters are stacked on a leading axis: ``nn.scan``, ``nnx.scan``,
``lax.scan`` over a stacked pytree) is unrolled into its iterations, each reading its layer as a
static ``slice`` of the stacked leaves (:func:`slice_units` finds such slices); other control
flow stays one primitive.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import core as jex_core

from asgssd_jax.primitives import ELEMENTWISE

__all__ = ["MAX_UNROLL", "Op", "Program", "TraceError", "leaf_path", "slice_path", "slice_units",
           "trace_program"]


#: Call-like primitives whose body is inlined (not control flow).
_INLINED = frozenset(
    {
        "jit",
        "pjit",
        "closed_call",
        "core_call",
        "custom_jvp_call",
        "custom_vjp_call",
        "custom_vjp_call_jaxpr",
        "checkpoint",
        "remat",
        "remat2",
        "custom_lin",
    }
)


class TraceError(ValueError):
    """The network could not be turned into a trace graph; the message says what to do."""


@dataclasses.dataclass(frozen=True, eq=False)
class Op:
    """One equation of the flattened jaxpr.

    ``invars`` holds variable ids (``int``) or ``jax.extend.core.Literal`` constants.
    """

    index: int
    primitive: Any
    params: dict[str, Any]
    invars: tuple[Any, ...]
    outvars: tuple[int, ...]
    name_stack: str
    source: str

    @property
    def name(self) -> str:
        return self.primitive.name

    def data_invars(self, data: set[int] | frozenset[int]) -> list[int]:
        return [v for v in self.invars if isinstance(v, int) and v in data]


@dataclasses.dataclass(eq=False)
class Program:
    """A jaxpr with every nested call inlined; variables are integer ids."""

    ops: list[Op]
    leaf_vars: list[int]  # ids of the flattened ``variables`` leaves
    arg_vars: list[int]  # ids of the flattened positional inputs
    consts: dict[int, Any]
    outvars: list[Any]  # ids or Literals
    avals: dict[int, Any]
    out_tree: Any
    producer: dict[int, int] = dataclasses.field(default_factory=dict)  # var id -> op index
    consumers: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    data: frozenset[int] = frozenset()  # ids of data variables
    arg_tree: Any = None  # treedef of the positional inputs (set by ``trace_program``)

    def shape(self, var: int) -> tuple[int, ...]:
        return tuple(self.avals[var].shape)

    def evaluate(self, leaves: Sequence[Any], args: Sequence[Any]) -> list[Any]:
        """Runs the flat program on concrete or traced values (a self-check of inlining)."""
        env: dict[int, Any] = dict(self.consts)
        env.update(zip(self.leaf_vars, leaves))
        env.update(zip(self.arg_vars, args))
        for op in self.ops:
            ins = [v.val if isinstance(v, jex_core.Literal) else env[v] for v in op.invars]
            outs = op.primitive.bind(*ins, **op.params)
            if not op.primitive.multiple_results:
                outs = [outs]
            env.update(zip(op.outvars, outs))
        return [v.val if isinstance(v, jex_core.Literal) else env[v] for v in self.outvars]


def _key_str(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_path(path: Sequence[Any]) -> str:
    """``(DictKey('params'), DictKey('conv'), ...)`` -> ``"params/conv/..."``."""
    parts = [_key_str(k) for k in path]
    if parts and parts[-1] == "value":  # nnx.Variable wrappers
        parts = parts[:-1]
    return "/".join(parts)


def _sub_jaxpr(eqn) -> tuple[Any, list[Any]] | None:
    if eqn.primitive.name not in _INLINED:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if sub is None:
            continue
        if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):
            return sub.jaxpr, list(sub.consts)
        if hasattr(sub, "eqns"):
            return sub, []
    return None


def _summarize_source(eqn) -> str:
    try:
        from jax._src import source_info_util

        return source_info_util.summarize(eqn.source_info)
    except Exception:  # pragma: no cover - private API drift
        return ""


def _join_stack(outer: str, inner: str) -> str:
    if outer and inner:
        return f"{outer}/{inner}"
    return outer or inner


#: A ``scan`` whose scanned operands include a static stack (parameters) is unrolled into
#: its iterations when it has at most this many; longer scans stay opaque.
MAX_UNROLL = 256


def _flatten(closed_jaxpr, num_leaves: int, out_tree) -> Program:
    ops: list[Op] = []
    avals: dict[int, Any] = {}
    consts: dict[int, Any] = {}
    counter = [0]
    data_ids: set[int] = set()  # values that depend on an input, as ops are appended

    def new(aval) -> int:
        i = counter[0]
        counter[0] += 1
        avals[i] = aval
        return i

    def emit(prim, params, ins, out_avals, stack) -> tuple[int, ...]:
        out_ids = tuple(new(a) for a in out_avals)
        if any(isinstance(v, int) and v in data_ids for v in ins):
            data_ids.update(out_ids)
        ops.append(Op(len(ops), prim, dict(params), tuple(ins), out_ids, stack, ""))
        return out_ids

    def as_var(x) -> int:
        if not isinstance(x, jex_core.Literal):
            return x
        i = new(jax.core.get_aval(x.val))
        consts[i] = x.val
        return i

    def index(x, j: int, stack: str) -> int:
        """``x[j]`` as the ops ``slice`` (one entry of axis 0) and ``squeeze``."""
        x = as_var(x)
        shape = tuple(avals[x].shape)
        (sliced,) = emit(jax.lax.slice_p,
                         {"start_indices": (j,) + (0,) * (len(shape) - 1),
                          "limit_indices": (j + 1,) + shape[1:], "strides": None},
                         [x], [avals[x].update(shape=(1,) + shape[1:])], stack)
        (out,) = emit(jax.lax.squeeze_p, {"dimensions": (0,)}, [sliced],
                      [avals[x].update(shape=shape[1:])], stack)
        return out

    def stack_values(parts: list, aval, stack: str) -> int:
        """``jnp.stack(parts)`` as ``broadcast_in_dim`` per part and one ``concatenate``."""
        shape = tuple(aval.shape[1:])
        rows = []
        for x in parts:
            x = as_var(x)
            (row,) = emit(jax.lax.broadcast_in_dim_p,
                          {"shape": (1,) + shape,
                           "broadcast_dimensions": tuple(range(1, len(shape) + 1)),
                           "sharding": None},
                          [x], [avals[x].update(shape=(1,) + shape)], stack)
            rows.append(row)
        if len(rows) == 1:
            return rows[0]
        (out,) = emit(jax.lax.concatenate_p, {"dimension": 0}, rows, [aval], stack)
        return out

    def unrollable(eqn, ins) -> bool:
        if eqn.primitive.name != "scan" or not 0 < eqn.params["length"] <= MAX_UNROLL:
            return False
        p = eqn.params
        xs = ins[p["num_consts"] + p["num_carry"]:]
        return any(isinstance(x, int) and x not in data_ids for x in xs)

    def unroll(eqn, ins, stack: str) -> list[Any]:
        """The iterations of a scan over a static stack, inlined one after the other; the
        index into the stack is written into each iteration's name stacks (``layers/3/...``,
        ``scan/3`` where the body names nothing)."""
        p = eqn.params
        nc, nk, length = p["num_consts"], p["num_carry"], p["length"]
        body = p["jaxpr"]
        carry = list(ins[nc:nc + nk])
        xs = ins[nc + nk:]
        ys: list[list[Any]] = [[None] * length for _ in eqn.outvars[nk:]]
        for j in (reversed(range(length)) if p["reverse"] else range(length)):
            at = _join_stack(stack, f"scan/{j}")
            outs = inline(body.jaxpr, list(body.consts),
                          [*ins[:nc], *carry, *(index(x, j, at) for x in xs)], stack,
                          layer=str(j))
            carry = outs[:nk]
            for k, y in enumerate(outs[nk:]):
                ys[k][j] = y
        return [*carry, *(stack_values(parts, o.aval, stack)
                          for parts, o in zip(ys, eqn.outvars[nk:]))]

    def inline(jaxpr, const_vals, in_ids, stack: str, layer: str | None = None) -> list[Any]:
        """Appends ``jaxpr``'s equations to ``ops``; ``layer``: the iteration of an unrolled
        scan, written after the first name of each equation's name stack (``layers/3/mlp``)."""
        env: dict[Any, Any] = {}

        def read(x):
            return x if isinstance(x, jex_core.Literal) else env[x]

        for v, c in zip(jaxpr.constvars, const_vals):
            i = new(v.aval)
            consts[i] = c
            env[v] = i
        for v, i in zip(jaxpr.invars, in_ids):
            env[v] = i
        for eqn in jaxpr.eqns:
            ins = [read(x) for x in eqn.invars]
            name = str(eqn.source_info.name_stack)
            if layer is not None:
                head, sep, rest = name.partition("/")
                name = f"{head}/{layer}{sep}{rest}" if head else f"scan/{layer}"
            eqn_stack = _join_stack(stack, name)
            sub = _sub_jaxpr(eqn)
            if sub is not None or unrollable(eqn, ins):
                outs = (inline(sub[0], sub[1], ins, eqn_stack) if sub is not None
                        else unroll(eqn, ins, eqn_stack))
                for o, r in zip(eqn.outvars, outs):
                    env[o] = r
                continue
            out_ids = tuple(new(o.aval) for o in eqn.outvars)
            for o, i in zip(eqn.outvars, out_ids):
                env[o] = i
            if any(isinstance(v, int) and v in data_ids for v in ins):
                data_ids.update(out_ids)
            ops.append(
                Op(len(ops), eqn.primitive, dict(eqn.params), tuple(ins), out_ids, eqn_stack,
                   _summarize_source(eqn))
            )
        return [read(x) for x in jaxpr.outvars]

    jaxpr = closed_jaxpr.jaxpr
    in_ids = [new(v.aval) for v in jaxpr.invars]
    data_ids.update(in_ids[num_leaves:])
    outs = inline(jaxpr, list(closed_jaxpr.consts), in_ids, "")
    prog = Program(ops, in_ids[:num_leaves], in_ids[num_leaves:], consts, outs, avals, out_tree)
    for op in ops:
        for o in op.outvars:
            prog.producer[o] = op.index
        for v in op.invars:
            if isinstance(v, int):
                prog.consumers.setdefault(v, []).append(op.index)
    data = set(prog.arg_vars)
    for op in ops:
        if any(isinstance(v, int) and v in data for v in op.invars):
            data.update(op.outvars)
    prog.data = frozenset(data)
    return prog


def _check_leaves(flat: list[tuple[Any, Any]]) -> None:
    for path, leaf in flat:
        if not (isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float, bool, complex))
                or hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            raise TraceError(
                f"variables leaf {leaf_path(path)!r} is a {type(leaf).__name__}, not an array; "
                "pass only arrays in `variables` (close over configuration in apply_fn instead)"
            )


def trace_program(
    apply_fn: Callable[..., Any], variables: Any, *args: Any, **kwargs: Any
) -> tuple[Program, list[str], Any]:
    """``jax.make_jaxpr`` of ``apply_fn(variables, *args, **kwargs)``, flattened.

    Returns the program, the "/"-joined path of every ``variables`` leaf, and the treedef of
    ``variables``.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
    _check_leaves(flat)
    leaves = [leaf for _, leaf in flat]
    paths = [leaf_path(p) for p, _ in flat]
    arg_leaves, arg_tree = jax.tree_util.tree_flatten(args)
    if not arg_leaves:
        raise TraceError("no sample input given: call with apply_fn, variables, *sample_inputs")
    n = len(leaves)
    out_tree_box: list[Any] = []

    def flat_fn(*xs):
        v = jax.tree_util.tree_unflatten(treedef, xs[:n])
        a = jax.tree_util.tree_unflatten(arg_tree, xs[n:])
        out = apply_fn(v, *a, **kwargs)
        out_leaves, out_tree = jax.tree_util.tree_flatten(out)
        out_tree_box.append(out_tree)
        return out_leaves

    try:
        closed = jax.make_jaxpr(flat_fn)(*leaves, *arg_leaves)
    except Exception as e:  # a user's model failing to trace is a user error
        shapes = ", ".join(str(getattr(a, "shape", type(a).__name__)) for a in arg_leaves)
        raise TraceError(
            f"apply_fn could not be traced with sample inputs of shape {shapes}: "
            f"{type(e).__name__}: {e}. Check that the sample has the shape the model expects "
            "(with a batch dimension) and that apply_fn(variables, *args, **kwargs) runs."
        ) from e
    program = _flatten(closed, n, out_tree_box[-1])
    program.arg_tree = arg_tree
    return program, paths, treedef


def slice_path(path: str, axis: int | None, indices: Sequence[int] = ()) -> str:
    """``path`` for a whole leaf, ``path[j]`` / ``path[:, j]`` / ``path[[j, k]]`` for entries
    ``indices`` along ``axis``."""
    if axis is None:
        return path
    idx = str(indices[0]) if len(indices) == 1 else str(list(indices))
    return f"{path}[{':, ' * axis}{idx}]"


def slice_units(prog: Program) -> dict[int, tuple[int, int, int]]:
    """``op index -> (leaf, axis, index)`` for every static ``slice`` that takes one entry
    along one axis of a variables leaf (or of an elementwise image of it, such as a cast):
    ``params["w"][3]`` of a stacked leaf, and each iteration of an unrolled scan over one.
    Such an op reads a *slice unit* of the leaf, not the whole leaf."""
    image = {v: i for i, v in enumerate(prog.leaf_vars)}  # var -> leaf it is an image of
    found: dict[int, tuple[int, int, int]] = {}
    for op in prog.ops:
        if not op.outvars or op.outvars[0] in prog.data:
            continue
        ins = [v for v in op.invars if isinstance(v, int)]
        if len(ins) != 1 or ins[0] not in image:
            continue
        shape = prog.shape(ins[0])
        if op.name == "slice" and not any(st not in (None, 1)
                                          for st in op.params["strides"] or ()):
            narrowed = [(a, lo, hi) for a, (lo, hi) in enumerate(
                zip(op.params["start_indices"], op.params["limit_indices"]))
                if (lo, hi) != (0, shape[a])]
            if len(narrowed) == 1 and narrowed[0][2] - narrowed[0][1] == 1:
                a, lo, _ = narrowed[0]
                found[op.index] = (image[ins[0]], a, lo)
        elif (op.name in ELEMENTWISE and len(op.outvars) == 1
              and prog.shape(op.outvars[0]) == shape):
            image[op.outvars[0]] = image[ins[0]]
    return found
