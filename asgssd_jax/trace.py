"""Trace graph: the data flow of a network's forward pass, read from its jaxpr.

``trace(apply_fn, variables, *args, **kwargs)`` runs ``jax.make_jaxpr`` once, inlines nested
jaxprs (``jit``, ``closed_call``, ``custom_jvp_call``, ``custom_vjp_call``, ``checkpoint``) into
one flat :class:`Program`, splits its values into *data* (depending on an input) and *static*
(parameters, constants and what is computed from them alone), and builds a :class:`TraceGraph`
whose vertices are data operations and whose edges are data values. Static computations fold
into the data operation that consumes them: the parameter leaves that reach an operation through
static computations are the leaves that operation owns.

Two contractions make vertices read like operators, as in the paper's pictures:

* a fan-out that reconverges in a *non-tolerant* joint (``mul``, ``div``, ``dot_general`` of two
  activations, ...) inside a single-entry single-exit region is one operator: ``silu``'s
  ``x * sigmoid(x)``, softmax, LayerNorm, a squeeze-and-excitation gate, an attention block.
  So is a non-tolerant joint with everything between it and its immediate dominator when
  nothing there escapes (a norm on a residual stream). Regions that contain a removal-tolerant
  joint fed by parameterised branches are kept open so that those branches stay searchable; an
  add/sub/concatenate whose operands derive from one data value through parameter-free
  operations (softmax's ``x - max(x)``) is a *self-joint*, not a tolerant joint;
* consecutive operations of one Flax module call (same name stack) on a chain are merged. This
  merging never changes the segment graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import networkx as nx
import numpy as np
from jax.extend import core as jex_core

from asgssd_jax.primitives import CONTROL_FLOW, ELEMENTWISE, TOLERANT_JOINTS

__all__ = [
    "CONTROL_FLOW",
    "TOLERANT_JOINTS",
    "Op",
    "Program",
    "TraceError",
    "TraceGraph",
    "Vertex",
    "leaf_path",
    "trace",
    "trace_program",
]

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


def _is_nnx_module(obj: Any) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, nnx.Module)


def nnx_functional(module) -> tuple[Callable[..., Any], dict[str, Any]]:
    """Splits an ``nnx.Module`` into ``apply_fn(variables, *args, **kwargs)`` and variables.

    ``variables`` is ``{"params": ..., "state": ...}`` of plain nested dicts, so parameter paths
    read ``"params/linear/kernel"`` as for linen.
    """
    from flax import nnx

    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    variables = {"params": nnx.to_pure_dict(params), "state": nnx.to_pure_dict(rest)}

    def apply_fn(variables, *args, **kwargs):
        p = jax.tree_util.tree_map(lambda x: x, params)
        r = jax.tree_util.tree_map(lambda x: x, rest)
        nnx.replace_by_pure_dict(p, variables["params"])
        nnx.replace_by_pure_dict(r, variables["state"])
        merged = nnx.merge(graphdef, p, r)
        with nnx_module_scopes(merged):
            return merged(*args, **kwargs)

    # What a later nnx.State of this module is merged with (construct_subnetwork takes one).
    apply_fn.nnx_graphdef = graphdef
    return apply_fn, variables


@contextlib.contextmanager
def nnx_module_scopes(module) -> Iterator[None]:
    """While tracing, each call of a submodule of ``module`` runs in a ``jax.named_scope`` of
    its attribute path relative to its caller, so that the jaxpr's name stacks read
    ``blocks/3/attn/q_proj`` as linen's do (NNX itself names nothing). The submodules' classes
    get a wrapped ``__call__`` for the duration. Inside a lifted transform (``nnx.scan`` over
    an ``nnx.vmap``-built stack) the modules called are copies: a copy is named as the
    attribute of its caller that it is, or, at the top, as the one submodule of its class. A
    call of any other instance is not renamed.
    """
    from flax import nnx

    paths = {id(node): tuple(str(k) for k in path) for path, node in nnx.iter_graph(module)
             if path and isinstance(node, nnx.Module)}
    classes = {type(node) for _, node in nnx.iter_graph(module) if isinstance(node, nnx.Module)}
    by_class: dict[type, list[tuple[str, ...]]] = {}
    for path, node in nnx.iter_graph(module):
        if path and isinstance(node, nnx.Module):
            by_class.setdefault(type(node), []).append(tuple(str(k) for k in path))
    originals = {cls: (cls.__dict__.get("__call__"), cls.__call__) for cls in classes
                 if callable(getattr(cls, "__call__", None))}
    stack: list[tuple[tuple[str, ...], Any]] = [((), None)]

    def resolve(instance) -> tuple[str, ...] | None:
        path = paths.get(id(instance))
        if path is not None:
            return path
        outer, caller = stack[-1]
        if caller is not None:
            for name, value in vars(caller).items():
                if value is instance:
                    return (*outer, name)
        found = by_class.get(type(instance), [])
        return found[0] if len(found) == 1 else None

    def wrap(call):
        def scoped(self, *args, **kwargs):
            path = resolve(self)
            if path is None:
                return call(self, *args, **kwargs)
            outer = stack[-1][0]
            rel = path[len(outer):] if path[:len(outer)] == outer else path
            stack.append((path, self))
            try:
                with jax.named_scope("/".join(rel) or path[-1]):
                    return call(self, *args, **kwargs)
            finally:
                stack.pop()
        return scoped

    try:
        for cls, (_, call) in originals.items():
            cls.__call__ = wrap(call)
        yield
    finally:
        for cls, (own, _) in originals.items():
            if own is None:
                del cls.__call__
            else:
                cls.__call__ = own


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


@dataclasses.dataclass(frozen=True, eq=False)
class Vertex:
    """An operator vertex of the trace graph."""

    id: int
    kind: str  # "input" | "op" | "output"
    ops: tuple[int, ...]  # op indices in program order
    primitives: tuple[str, ...]
    module: str  # Flax module path (name stack) of the first op
    shape: tuple[int, ...]  # shape of the vertex's (first) output
    leaves: frozenset[int]  # units it owns: leaf indices, or slice units (TraceGraph.units)

    @property
    def label(self) -> str:
        if self.kind != "op":
            return self.kind
        ops = _op_summary(self.primitives)
        return f"{self.module}\\n{ops}" if self.module else ops


_SHORT = {
    "conv_general_dilated": "Conv",
    "dot_general": "Dot",
    "reduce_window_max": "MaxPool",
    "reduce_window_sum": "SumPool",
    "reduce_window": "Pool",
    "concatenate": "Concat",
    "add": "Add",
    "add_any": "Add",
    "sub": "Sub",
    "mul": "Mul",
    "max": "Max",
    "logistic": "Sigmoid",
}


def _op_summary(prims: Sequence[str]) -> str:
    seen: list[str] = []
    for p in prims:
        s = _SHORT.get(p, p)
        if s not in seen:
            seen.append(s)
    if len(seen) > 4:
        seen = seen[:4] + ["..."]
    return "-".join(seen)


class TraceGraph:
    """Operator vertices and data edges of one forward pass.

    Attributes:
      graph: ``networkx.DiGraph`` over vertex ids; edge attribute ``slots`` counts how many
        operand slots of the head read the tail's outputs.
      vertices: :class:`Vertex` by id.
      program: the flat :class:`Program` it was read from.
      leaf_paths: "/"-joined path of every ``variables`` leaf, in ``tree_leaves`` order.
      trainable: whether each leaf is a trainable parameter (the ``params`` collection for linen
        and NNX variables; every floating leaf for a plain parameter tree).
      units, unit_ops: what vertices own: ids below ``len(leaf_paths)`` are whole leaves,
        later ids slice units ``(leaf, axis, index)``, each read by the static ``slice`` ops
        ``unit_ops[id]`` (a stacked leaf indexed by layer, an unrolled scan).
      inputs, output: ids of the input vertices and of the single output vertex.
      self_joint_ops: add/sub/concatenate ops that combine one value with itself (softmax's
        ``x - max(x)``): not removal-tolerant joints.
    """

    def __init__(self, graph, vertices, program, leaf_paths, trainable, inputs, output, treedef,
                 self_joint_ops: frozenset[int] = frozenset()):
        self.graph: nx.DiGraph = graph
        self.vertices: dict[int, Vertex] = vertices
        self.program: Program = program
        self.leaf_paths: list[str] = leaf_paths
        self.trainable: list[bool] = trainable
        self.inputs: list[int] = inputs
        self.output: int = output
        self.treedef = treedef
        self.self_joint_ops = self_joint_ops
        self.vertex_of_op: dict[int, int] = {
            i: v.id for v in vertices.values() for i in v.ops
        }
        # Units: ids 0..len(leaf_paths)-1 are whole leaves; later ids are slice units
        # ``(leaf, axis, index)`` read by the static ``slice`` ops ``unit_ops[id]``.
        self.units: list[tuple[int, int | None, int | None]] = [
            (i, None, None) for i in range(len(leaf_paths))]
        self.unit_ops: dict[int, list[int]] = {}

    def __repr__(self) -> str:
        return (
            f"TraceGraph(|V|={self.graph.number_of_nodes()}, |E|={self.graph.number_of_edges()}, "
            f"ops={len(self.program.ops)}, leaves={len(self.leaf_paths)})"
        )

    def unit_leaf(self, u: int) -> int:
        """The variables leaf of unit ``u`` (a vertex's ``leaves`` hold units)."""
        return self.units[u][0]

    def unit_path(self, u: int) -> str:
        """``path`` for a whole leaf, ``path[j]`` (``path[:, j]``, ...) for a slice unit."""
        leaf, axis, index = self.units[u]
        if axis is None:
            return self.leaf_paths[leaf]
        return f"{self.leaf_paths[leaf]}[{':, ' * axis}{index}]"

    def unit_trainable(self, u: int) -> bool:
        return self.trainable[self.units[u][0]]

    def unit_size(self, u: int) -> int:
        leaf, axis, _ = self.units[u]
        shape = self.program.shape(self.program.leaf_vars[leaf])
        n = int(np.prod(shape, dtype=np.int64))
        return n if axis is None else n // shape[axis]

    def is_joint(self, v: int) -> bool:
        return self.graph.in_degree(v) >= 2

    def is_tolerant_joint(self, v: int) -> bool:
        """A joint whose operator is removal-tolerant (add, add_any, sub, concatenate) and that
        joins two branches (not one value with itself, as softmax's ``x - max(x)``)."""
        if not self.is_joint(v):
            return False
        vert = self.vertices[v]
        if vert.kind != "op":
            return False
        first = vert.ops[0]
        return self.program.ops[first].name in TOLERANT_JOINTS and first not in self.self_joint_ops


def _trainable_mask(paths: list[str], leaves: list[Any]) -> list[bool]:
    top = {p.split("/", 1)[0] for p in paths}
    if "params" in top:
        return [p.split("/", 1)[0] == "params" for p in paths]
    return [np.issubdtype(np.asarray(getattr(x, "dtype", np.float32)), np.floating)
            if not hasattr(x, "dtype") else jax.numpy.issubdtype(x.dtype, jax.numpy.floating)
            for x in leaves]


def trace(apply_fn: Callable[..., Any], variables: Any, *args: Any, **kwargs: Any) -> TraceGraph:
    """Builds the trace graph of ``apply_fn(variables, *args, **kwargs)``.

    ``apply_fn`` may be a linen ``model.apply``, any pure function of a parameter tree, or an
    ``nnx.Module`` (then ``variables`` must be ``None``). ``kwargs`` are static (e.g.
    ``train=False``). Runs in O(|ops|) plus the region analysis (post-dominators).
    """
    if _is_nnx_module(apply_fn):
        if variables is not None:
            raise TraceError("pass an nnx.Module as apply_fn with variables=None")
        apply_fn, variables = nnx_functional(apply_fn)
    prog, paths, treedef = trace_program(apply_fn, variables, *args, **kwargs)
    trainable = _trainable_mask(paths, jax.tree_util.tree_leaves(variables))
    return _build_graph(prog, paths, trainable, treedef)


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


def _static_owners(prog: Program, unit_of_op: dict[int, int]) -> dict[int, frozenset[int]]:
    """Units (leaf indices, or slice units from ``unit_of_op``) reaching each static variable
    through static computations."""
    owners: dict[int, frozenset[int]] = {v: frozenset((i,)) for i, v in enumerate(prog.leaf_vars)}
    empty: frozenset[int] = frozenset()
    for op in prog.ops:
        if op.outvars and op.outvars[0] in prog.data:
            continue
        if op.index in unit_of_op:
            owners[op.outvars[0]] = frozenset((unit_of_op[op.index],))
            continue
        acc = empty
        for v in op.invars:
            if isinstance(v, int):
                o = owners.get(v)
                if o:
                    acc = acc | o if acc else o
        if acc:
            for o in op.outvars:
                owners[o] = acc
    return owners


def _build_graph(prog: Program, paths, trainable, treedef) -> TraceGraph:
    data = prog.data
    units: list[tuple[int, int | None, int | None]] = [(i, None, None) for i in range(len(paths))]
    unit_id: dict[tuple[int, int, int], int] = {}
    unit_of_op: dict[int, int] = {}
    for i, u in slice_units(prog).items():
        if u not in unit_id:
            unit_id[u] = len(units)
            units.append(u)
        unit_of_op[i] = unit_id[u]
    owners = _static_owners(prog, unit_of_op)
    unit_trainable = list(trainable) + [trainable[leaf] for leaf, _, _ in units[len(paths):]]
    g = nx.DiGraph()
    # Raw vertices: one per input leaf, one per data op, one output.
    raw_ops: dict[int, list[int]] = {}
    raw_leaves: dict[int, frozenset[int]] = {}
    kind: dict[int, str] = {}
    producer_vertex: dict[int, int] = {}
    nid = 0
    inputs = []
    for v in prog.arg_vars:
        kind[nid] = "input"
        raw_ops[nid] = []
        raw_leaves[nid] = frozenset()
        producer_vertex[v] = nid
        g.add_node(nid)
        inputs.append(nid)
        nid += 1
    for op in prog.ops:
        if not op.outvars or op.outvars[0] not in data:
            continue
        me = nid
        nid += 1
        kind[me] = "op"
        raw_ops[me] = [op.index]
        leaves: frozenset[int] = frozenset()
        g.add_node(me)
        for x in op.invars:
            if not isinstance(x, int):
                continue
            if x in data:
                src = producer_vertex[x]
                if g.has_edge(src, me):
                    g[src][me]["slots"] += 1
                else:
                    g.add_edge(src, me, slots=1)
            elif x in owners:
                leaves = leaves | owners[x]
        raw_leaves[me] = leaves
        for o in op.outvars:
            producer_vertex[o] = me
    output = nid
    kind[output] = "output"
    raw_ops[output] = []
    raw_leaves[output] = frozenset()
    g.add_node(output)
    for x in prog.outvars:
        if isinstance(x, int) and x in data:
            src = producer_vertex[x]
            if g.has_edge(src, output):
                g[src][output]["slots"] += 1
            else:
                g.add_edge(src, output, slots=1)
    if g.in_degree(output) == 0:
        raise TraceError(
            "the network's output does not depend on its input: nothing to search. Check that "
            "apply_fn uses its input arguments (and that they are not closed over as constants)"
        )

    def first_prim(v: int) -> str:
        return prog.ops[raw_ops[v][0]].name if kind[v] == "op" else kind[v]

    # 1. Single-entry single-exit regions closed by a non-tolerant joint become one operator.
    # The regions are found without the side inputs (an additive attention mask).
    has_params = {v: any(unit_trainable[i] for i in raw_leaves[v]) for v in g.nodes}
    side = _side_inputs(g, kind, first_prim, has_params)
    ga = g.copy()
    ga.remove_edges_from(side)
    idom = _dominators(ga)
    self_joints = _self_joints(ga, kind, first_prim, has_params, idom) | {u for _, u in side}
    groups = _UnionFind(g.nodes)
    _collapse_regions(ga, kind, first_prim, has_params, self_joints, groups, idom)
    # 2. Chains inside one module call merge.
    stack_of = {v: prog.ops[raw_ops[v][0]].name_stack for v in g.nodes if kind[v] == "op"}
    for u in list(g.nodes):
        if kind[u] != "op" or g.out_degree(u) != 1:
            continue
        (w,) = g.successors(u)
        if kind[w] == "op" and g.in_degree(w) == 1 and stack_of[u] == stack_of[w]:
            groups.union(u, w)
    t = _contract(g, groups, kind, raw_ops, raw_leaves, prog, paths, trainable, inputs,
                  output, treedef, frozenset(raw_ops[v][0] for v in self_joints))
    t.units = units
    t.unit_ops = {}
    for i, u in unit_of_op.items():
        t.unit_ops.setdefault(u, []).append(i)
    return t


class _UnionFind:
    def __init__(self, items):
        self.parent = {i: i for i in items}

    def find(self, x):
        parent = self.parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # keep the smaller id (earlier in program order) as representative
            if rb < ra:
                ra, rb = rb, ra
            self.parent[rb] = ra


def _self_joints(g, kind, first_prim, has_params, idom) -> set[int]:
    """Add/sub/concatenate vertices whose operands all derive from one data value through
    parameter-free operations: softmax's ``x - stop_gradient(max(x))``, a norm's
    ``x - mean(x)``, tanh-GELU's ``x + 0.044715 x^3``, RoPE's rotation. Such a vertex combines a
    value with itself, not two branches, so it is not a removal-tolerant joint.

    The one value is the vertex's immediate dominator; every vertex strictly between the two
    must own no trainable parameter. O(|V| + |E|) for the dominators plus a backward walk per
    joint that stops at the first parameterised vertex.
    """
    found = set()
    for u in g.nodes:
        if kind[u] != "op" or g.in_degree(u) < 2 or first_prim(u) not in TOLERANT_JOINTS:
            continue
        w = idom.get(u)
        if w is None or w == _SOURCE:
            continue
        between = _walk(g.predecessors, u, {w}, lambda x: kind[x] == "op" and not has_params[x])
        if between is not None:
            found.add(u)
    return found


_SOURCE = "__source__"

_ADDITIVE = frozenset({"add", "add_any", "sub"})


def _side_inputs(g, kind, first_prim, has_params) -> list[tuple[int, int]]:
    """Edges ``(p, u)`` into an add/sub ``u`` where ``p`` is a *side input*: a parameter-free
    function of the network's inputs alone (no trainable variable upstream) that the other
    operands do not read, added to a branch that has parameters upstream: BERT's additive
    attention mask ``scores + bias(attention_mask)``, a bias computed from position ids.

    Such a joint adds a value that is not a branch of the network: it is not removal-tolerant
    (the scores are not a branch that could be absent: q, k, v and the output projection
    stay one structure), and the regions that make operators are found without these edges.
    A residual ``x + f(x)`` is not one (``x`` is read by ``f(x)``).
    """
    upstream: dict[int, bool] = {}
    for v in nx.topological_sort(g):
        upstream[v] = has_params[v] or any(upstream[p] for p in g.predecessors(v))
    edges = []
    for u in g.nodes:
        if kind[u] != "op" or g.in_degree(u) < 2 or first_prim(u) not in _ADDITIVE:
            continue
        preds = list(g.predecessors(u))
        if not any(upstream[q] for q in preds):
            continue
        for p in preds:
            if upstream[p]:
                continue
            if any(q != p and nx.has_path(g, p, q) for q in preds):
                continue  # read by another operand: a residual, not a side input
            edges.append((p, u))
    return edges


def _dominators(g) -> dict:
    """Immediate dominators from a virtual source (``_SOURCE``) feeding every input."""
    fwd = g.copy()
    fwd.add_edges_from((_SOURCE, v) for v in g.nodes if g.in_degree(v) == 0)
    return nx.immediate_dominators(fwd, _SOURCE)


def _collapse_regions(g, kind, first_prim, has_params, self_joints, groups, idom) -> None:
    fanouts = [v for v in g.nodes if g.out_degree(v) > 1]
    if not fanouts:
        return
    sink = "__sink__"
    rev = g.reverse(copy=True)
    for v in g.nodes:
        if g.out_degree(v) == 0:
            rev.add_edge(sink, v)
    ipdom = nx.immediate_dominators(rev, sink)
    for v in fanouts:
        p = ipdom.get(v)
        if p is None or p == sink or kind[p] != "op":
            continue
        if first_prim(p) in TOLERANT_JOINTS and p not in self_joints:
            continue
        # the region: everything reached from v before p
        region = _walk(g.successors, v, {v, p}, lambda u: kind[u] == "op")
        if region is None:
            continue
        members = set(region) | {p}
        allowed = members | {v}
        if any(pred not in allowed for u in members for pred in g.predecessors(u)):
            continue  # not single-entry
        if not _region_keeps_no_searchable_branch(g, region, members, v, first_prim, has_params,
                                                  self_joints):
            continue
        for u in members:
            groups.union(p, u)
    _collapse_joint_regions(g, kind, first_prim, has_params, self_joints, groups, idom, ipdom,
                            sink)


def _collapse_joint_regions(g, kind, first_prim, has_params, self_joints, groups, idom, ipdom,
                            sink) -> None:
    """A non-tolerant joint u and everything between its immediate dominator w and u become one
    operator when nothing between leaves except through u, even where w also feeds other
    operators: a norm on a residual stream (``x - mean(x)`` and the scale multiplied into
    ``rsqrt(var + eps)``), attention whose q, k and v read the stream directly (post-norm and
    parallel blocks). O(|V| + |E|) for the dominator trees plus a backward walk per joint that
    stops at the first vertex u does not post-dominate."""
    joints = [u for u in g.nodes
              if kind[u] == "op" and g.in_degree(u) >= 2
              and (first_prim(u) not in TOLERANT_JOINTS or u in self_joints)]
    if not joints:
        return
    tin, tout = _tree_intervals(ipdom, sink)
    for u in joints:
        w = idom.get(u)
        if w is None or w == _SOURCE:
            continue
        # everything between w and u; each vertex must be post-dominated by u (not escape)
        region = _walk(g.predecessors, u, {w, u},
                       lambda x: kind[x] == "op" and x in tin
                       and tin[u] <= tin[x] <= tout[x] <= tout[u])  # noqa: B023
        if not region:
            continue
        members = set(region) | {u}
        if not _region_keeps_no_searchable_branch(g, region, members, w, first_prim, has_params,
                                                  self_joints):
            continue
        for x in region:
            groups.union(u, x)


def _walk(neighbours, start, seen: set, admit) -> list | None:
    """The vertices reached from ``start``'s neighbours, not crossing ``seen``; None as soon as
    one is not ``admit``-ted."""
    found = []
    stack = list(neighbours(start))
    while stack:
        x = stack.pop()
        if x in seen:
            continue
        seen.add(x)
        if not admit(x):
            return None
        found.append(x)
        stack.extend(neighbours(x))
    return found


def _tree_intervals(parent: dict, root) -> tuple[dict, dict]:
    """DFS entry/exit times of the tree given by ``parent`` (x is below y iff y's interval
    contains x's)."""
    children: dict = {}
    for x, p in parent.items():
        if x != root:
            children.setdefault(p, []).append(x)
    tin: dict = {}
    tout: dict = {}
    clock = 0
    stack = [(root, False)]
    while stack:
        x, done = stack.pop()
        if done:
            tout[x] = clock
            continue
        tin[x] = clock
        clock += 1
        stack.append((x, True))
        stack.extend((c, False) for c in children.get(x, ()))
    return tin, tout


def _region_keeps_no_searchable_branch(g, region, members, entry, first_prim, has_params,
                                       self_joints) -> bool:
    """False when a tolerant joint inside the region is fed by two parameterised branches."""
    sub = g.subgraph(members)
    upstream: dict[int, bool] = {}
    for u in nx.topological_sort(sub):
        upstream[u] = has_params[u] or any(upstream.get(q, False) for q in sub.predecessors(u))
        if (first_prim(u) in TOLERANT_JOINTS and g.in_degree(u) >= 2
                and u not in self_joints):
            fed = sum(1 for q in g.predecessors(u) if q in members and upstream.get(q, False))
            if fed >= 2 or (fed >= 1 and has_params[entry]):
                return False
    return True


def _contract(g, groups, kind, raw_ops, raw_leaves, prog, paths, trainable, inputs, output,
              treedef, self_joint_ops) -> TraceGraph:
    members: dict[int, list[int]] = {}
    for v in g.nodes:
        members.setdefault(groups.find(v), []).append(v)
    # Renumber in program order: inputs, ops by first op index, output.
    def order_key(root):
        k = kind[root]
        if k == "input":
            return (0, root)
        if k == "output":
            return (2, root)
        return (1, min(raw_ops[m][0] for m in members[root]))

    roots = sorted(members, key=order_key)
    # A linen model's name stack starts with its class name: drop a root shared by all ops.
    stacks = {_module_of(prog.ops[i].name_stack) for i in range(len(prog.ops))}
    heads = {s.split("/", 1)[0] for s in stacks}
    strip = next(iter(heads)) + "/" if len(heads) == 1 and "" not in heads else None

    def module_path(stack: str) -> str:
        m = _module_of(stack)
        if strip is None:
            return m
        return m[len(strip):] if m.startswith(strip) else ("" if m == strip[:-1] else m)

    new_id = {r: i for i, r in enumerate(roots)}
    vertices: dict[int, Vertex] = {}
    cg = nx.DiGraph()
    for r in roots:
        ms = members[r]
        ops = tuple(sorted(i for m in ms for i in raw_ops[m]))
        leaves = frozenset().union(*(raw_leaves[m] for m in ms))
        k = kind[r]
        if k == "op":
            first = prog.ops[ops[0]]
            last = prog.ops[ops[-1]]
            shape = prog.shape(last.outvars[0]) if last.outvars else ()
            module = module_path(first.name_stack)
            prims = tuple(prog.ops[i].name for i in ops)
        elif k == "input":
            shape = prog.shape(prog.arg_vars[inputs.index(r)])
            module, prims = "", ()
        else:
            shape, module, prims = (), "", ()
        vid = new_id[r]
        vertices[vid] = Vertex(vid, k, ops, prims, module, shape, leaves)
        cg.add_node(vid)
    for u, w, d in g.edges(data=True):
        a, b = new_id[groups.find(u)], new_id[groups.find(w)]
        if a == b:
            continue
        if cg.has_edge(a, b):
            cg[a][b]["slots"] += d["slots"]
        else:
            cg.add_edge(a, b, slots=d["slots"])
    return TraceGraph(cg, vertices, prog, paths, trainable,
                      [new_id[i] for i in inputs], new_id[output], treedef, self_joint_ops)


def _module_of(name_stack: str) -> str:
    """Drops JAX transform wrappers such as ``jvp(...)`` from a name stack."""
    parts = []
    for p in name_stack.split("/"):
        if not p:
            continue
        while "(" in p and p.endswith(")"):
            p = p[p.index("(") + 1 : -1]
        parts.append(p)
    return "/".join(parts)
