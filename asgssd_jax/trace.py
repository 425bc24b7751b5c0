"""Trace graph: the data flow of a network's forward pass, read from its jaxpr.

``trace(apply_fn, variables, *args, **kwargs)`` flattens the forward pass into one
:class:`~asgssd_jax.program.Program` (nested calls inlined, scans over stacked layers unrolled),
splits its values into *data* (depending on an input) and *static* (parameters, constants and
what is computed from them alone), and builds a :class:`TraceGraph` whose vertices are data
operations and whose edges are data values. Static computations fold into the data operation
that consumes them: the parameter *units* that reach an operation through static computations
(whole leaves, or one layer's slice of a stacked leaf) are the ones that operation owns.

Two contractions make vertices read like operators, as in the paper's pictures:

* the regions of :mod:`asgssd_jax.regions` (a fan-out that reconverges in a non-tolerant joint:
  SiLU, softmax, LayerNorm, an attention block) become one operator;
* consecutive operations of one Flax module call (same name stack) on a chain are merged. This
  merging never changes the segment graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import networkx as nx
import numpy as np

from asgssd_jax.nnx_trace import _is_nnx_module, nnx_functional, nnx_module_scopes
from asgssd_jax.primitives import CONTROL_FLOW, TOLERANT_JOINTS
from asgssd_jax.program import (
    MAX_UNROLL,
    Op,
    Program,
    TraceError,
    leaf_path,
    slice_path,
    slice_units,
    trace_program,
)
from asgssd_jax.regions import operator_regions

__all__ = [
    "CONTROL_FLOW",
    "MAX_UNROLL",
    "TOLERANT_JOINTS",
    "Op",
    "Program",
    "TraceError",
    "TraceGraph",
    "Vertex",
    "leaf_path",
    "nnx_functional",
    "nnx_module_scopes",
    "slice_units",
    "trace",
    "trace_program",
]

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
        return slice_path(self.leaf_paths[leaf], axis, (index,))

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
    groups, self_joints = operator_regions(g, kind, first_prim, has_params)
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
