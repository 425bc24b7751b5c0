"""Operator vertices: the regions of the raw trace graph that become one operator.

A fan-out that reconverges in a *non-tolerant* joint (``mul``, ``div``, ``dot_general`` of two
activations, ...) inside a single-entry single-exit region is one operator: ``silu``'s
``x * sigmoid(x)``, softmax, LayerNorm, a squeeze-and-excitation gate, an attention block. So is
a non-tolerant joint with everything between it and its immediate dominator when nothing there
escapes (a norm on a residual stream). Regions that contain a removal-tolerant joint fed by
parameterised branches are kept open so that those branches stay searchable. Two kinds of
add/sub are not tolerant joints: *self-joints*, whose operands derive from one data value
through parameter-free operations (softmax's ``x - max(x)``), and joints with a *side input*
(a parameter-free function of the inputs added to a parameterised branch: an attention mask's
bias); regions are found without the side inputs' edges.
"""

from __future__ import annotations

import networkx as nx

from asgssd_jax.primitives import TOLERANT_JOINTS

__all__ = ["operator_regions"]


def operator_regions(g: nx.DiGraph, kind: dict, first_prim, has_params: dict
                     ) -> tuple[_UnionFind, set]:
    """Union-find of the vertices of ``g`` that form one operator, and the add/sub/concat
    vertices that are not removal-tolerant joints (self-joints and side-input joints)."""
    side = _side_inputs(g, kind, first_prim, has_params)
    ga = g.copy()
    ga.remove_edges_from(side)
    idom = _dominators(ga)
    self_joints = _self_joints(ga, kind, first_prim, has_params, idom) | {u for _, u in side}
    groups = _UnionFind(g.nodes)
    _collapse_regions(ga, kind, first_prim, has_params, self_joints, groups, idom)
    return groups, self_joints


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
