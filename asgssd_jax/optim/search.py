"""Hierarchical search (Algorithm 3, lines 3-10) over a segment graph.

H2SPG runs the search once, at the end of warm-up. Validity is Algorithm 3's, for every input
and output: with the removed structures deleted from the segment graph, every (input leaf,
output leaf) pair connected in the full network is still connected. The graph is turned into
static arrays at construction (:class:`SearchGraph`); :func:`hierarchical_search` is pure
``jnp``/``lax`` over them, so it runs under ``jit``, ``pmap`` and sharding without touching the
host. H2SPG calls it through :func:`hierarchical_search_callback`, one ``jax.pure_callback``
that runs the same function compiled once for the host's CPU: the train step then compiles no
search of its own.

Two facts make the search cheap. Number the segments in a topological order with the inputs
first and let U be the *useful* segments, those on some input-to-output path. (1) Deleting a
segment v that is not in U leaves the output reachable. (2) Deleting v in U keeps the output
reachable iff some edge a -> b with both ends in U jumps over v (pos(a) < pos(v) < pos(b)):
such an edge lies on a path that avoids v, and any path that avoids v must cross v's
position. So each candidate costs one vectorised O(|E_s|) test, and after an acceptance U is
shrunk by peeling (a worklist of segments that lost their last useful predecessor or
successor); every segment leaves U at most once.

With several connected (input, output) pairs (two heads, intermediate activations returned next
to the logits, a second input such as a mask or a timestep), each candidate is instead tested by
one pass over the segments in topological order carrying which inputs reach each segment
(:func:`~asgssd_jax.search_space.pairs_connected`), O(|V_s| * max in-degree * inputs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np

from asgssd_jax.search_space import pairs_connected, pairs_stay_connected

__all__ = ["SearchGraph", "hierarchical_search", "hierarchical_search_callback",
           "host_hierarchical_search", "top_k_search"]

# An "infinite" path cost; 2 * INF still fits in int32.
INF = 1 << 20


@dataclasses.dataclass(frozen=True, eq=False)
class SearchGraph:
    """Static arrays of a segment graph for :func:`hierarchical_search`.

    Segments are renumbered by a topological order with the inputs first; ``n`` (one past the
    last segment) is a dummy that pads ``succ`` and ``pred``.

    Attributes:
      num_groups: |G_s|.
      num_nodes: number of segments ``n``.
      group_node: position of each group's segment, ``int32[G]``.
      succ, pred: successors / predecessors of each position, ``int32[n + 1, max degree]``.
      edge_src, edge_dst: the edges, ``int32[E]``.
      is_source: the inputs, ``bool[n + 1]``.
      output: position of the output segment.
      weight: 1 where a segment is a group's, ``int32[n + 1]``.
      useful: segments on an input-to-output path, ``bool[n + 1]``.
      useful_preds, useful_succs: each segment's useful predecessors / successors, ``int32[n+1]``.
      dist_from_input, dist_to_output: fewest groups on a path from an input to the segment /
        from it to the output, both ends included (``INF``: no path), ``int32[n + 1]``.
      min_kept: fewest groups on any input-to-output path; at most
        ``num_groups - min_kept`` groups can be removed together.
      pair_target, pair_column, source_column, num_sources: with several connected
        (input, output) pairs (else None): pair ``p`` needs position ``pair_target[p]`` reached
        from the input of column ``pair_column[p]``; ``source_column`` gives each position's
        column (-1: not an input).
      reserve: with several pairs, ``bool[G]``, groups whose keeping makes removing all the
        others valid (found on the host: a fewest-groups path per pair, paths sharing groups
        where they can, then greedy removal); ``max_removable`` is the number of the others.
    """

    num_groups: int
    num_nodes: int
    group_node: np.ndarray
    succ: np.ndarray
    pred: np.ndarray
    edge_src: np.ndarray
    edge_dst: np.ndarray
    is_source: np.ndarray
    output: int
    weight: np.ndarray
    useful: np.ndarray
    useful_preds: np.ndarray
    useful_succs: np.ndarray
    dist_from_input: np.ndarray
    dist_to_output: np.ndarray
    min_kept: int
    pair_target: np.ndarray | None = None
    pair_column: np.ndarray | None = None
    source_column: np.ndarray | None = None
    num_sources: int = 0
    reserve: np.ndarray | None = None

    @property
    def max_removable(self) -> int:
        """The most groups that can be removed together with the set still valid (with several
        input-output pairs: the most the host's construction of ``reserve`` found)."""
        if self.reserve is not None:
            return self.num_groups - int(self.reserve.sum())
        return self.num_groups - self.min_kept

    @classmethod
    def from_space(cls, space: Any) -> SearchGraph:
        """From a :class:`~asgssd_jax.SearchSpace`'s segment graph, groups and input-output
        pairs."""
        sg = space.segment_graph
        nodes = [g.segment for g in space.groups]
        pairs = list(space.io_pairs)
        if len(pairs) > 1:
            return cls.from_pairs(sg.graph, pairs, nodes)
        return cls.from_graph(sg.graph, sg.inputs, sg.output, nodes)

    @classmethod
    def from_pairs(cls, graph: nx.DiGraph, pairs: Sequence[tuple[Hashable, Hashable]],
                   group_nodes: Sequence[Hashable]) -> SearchGraph:
        """From any DAG and the (input, output) node pairs that must stay connected.

        O(P (|V| log |V| + |E|)) for the reserve, plus O(G) host validity checks.
        """
        pairs = list(pairs)
        sources = list(dict.fromkeys(s for s, _ in pairs))
        sink = ("__outputs__",)
        joined = graph.copy()
        joined.add_edges_from((t, sink) for _, t in pairs)
        base = cls.from_graph(joined, sources, sink, group_nodes)
        pos = _positions(joined, sources)
        n = base.num_nodes
        column = np.full(n, -1, np.int32)
        column[[pos[s] for s in sources]] = np.arange(len(sources))
        return dataclasses.replace(
            base,
            pair_target=np.array([pos[t] for _, t in pairs], np.int32),
            pair_column=np.array([sources.index(s) for s, _ in pairs], np.int32),
            source_column=column, num_sources=len(sources),
            reserve=_reserve(graph, pairs, list(group_nodes)),
        )

    @classmethod
    def from_graph(cls, graph: nx.DiGraph, inputs: Iterable[Hashable], output: Hashable,
                   group_nodes: Sequence[Hashable]) -> SearchGraph:
        """From any DAG: ``group_nodes[i]`` is the node of group ``i``. O(|V| + |E|).

        Raises:
          ValueError: if the graph has a cycle or the output is not reachable from an input.
        """
        if not nx.is_directed_acyclic_graph(graph):
            raise ValueError("the segment graph has a cycle; hierarchical search needs a DAG")
        inputs = list(inputs)
        pos = _positions(graph, inputs)
        order = sorted(pos, key=pos.get)
        n = len(order)
        succ_lists = [[pos[w] for w in graph.successors(v)] for v in order]
        pred_lists = [[pos[w] for w in graph.predecessors(v)] for v in order]

        def pad(lists):
            width = max([len(x) for x in lists] + [1])
            out = np.full((n + 1, width), n, np.int32)
            for i, x in enumerate(lists):
                out[i, : len(x)] = x
            return out

        edges = np.array([(pos[a], pos[b]) for a, b in graph.edges()], np.int32).reshape(-1, 2)
        is_source = np.zeros(n + 1, bool)
        is_source[[pos[v] for v in inputs]] = True
        out = pos[output]
        group_node = np.array([pos[v] for v in group_nodes], np.int32)
        weight = np.zeros(n + 1, np.int32)
        weight[group_node] = 1

        ds = np.full(n + 1, INF, np.int64)
        for i in range(n):  # topological order
            if is_source[i]:
                ds[i] = weight[i]
            elif pred_lists[i]:
                ds[i] = min(INF, weight[i] + min(ds[p] for p in pred_lists[i]))
        dt = np.full(n + 1, INF, np.int64)
        dt[out] = weight[out]
        for i in reversed(range(n)):
            if i != out and succ_lists[i]:
                dt[i] = min(INF, weight[i] + min(dt[s] for s in succ_lists[i]))
        if ds[out] >= INF:
            raise ValueError("the output is not reachable from any input: nothing can be searched")
        useful = (ds < INF) & (dt < INF)
        useful_preds = np.zeros(n + 1, np.int32)
        useful_succs = np.zeros(n + 1, np.int32)
        for a, b in edges:
            if useful[a] and useful[b]:
                useful_succs[a] += 1
                useful_preds[b] += 1
        return cls(
            num_groups=len(group_node), num_nodes=n, group_node=group_node,
            succ=pad(succ_lists), pred=pad(pred_lists),
            edge_src=edges[:, 0].copy(), edge_dst=edges[:, 1].copy(),
            is_source=is_source, output=out, weight=weight, useful=useful,
            useful_preds=useful_preds, useful_succs=useful_succs,
            dist_from_input=ds.astype(np.int32), dist_to_output=dt.astype(np.int32),
            min_kept=int(ds[out]),
        )


def _positions(graph: nx.DiGraph, inputs: Sequence[Hashable]) -> dict[Hashable, int]:
    """A topological numbering with the inputs first."""
    sources = set(inputs)
    topo = list(nx.topological_sort(graph))
    order = [v for v in topo if v in sources] + [v for v in topo if v not in sources]
    return {v: i for i, v in enumerate(order)}


def _reserve(graph: nx.DiGraph, pairs, group_nodes: list[Hashable]) -> np.ndarray:
    """Groups to keep so that removing all the others is valid, found greedily: per pair a
    path through the fewest groups not kept yet, then each kept group removed if it can be.
    Every rotation of the pairs' order is tried and the smallest reserve kept: O(P^2) paths."""
    group_of = {v: i for i, v in enumerate(group_nodes)}

    def build(order) -> set[Hashable]:
        kept: set[Hashable] = set()
        for s, t in order:
            path = nx.dijkstra_path(
                graph, s, t, weight=lambda u, v, d: 1 if v in group_of and v not in kept else 0)
            kept.update(v for v in path if v in group_of)
        removed = set(group_nodes) - kept
        for v in sorted(kept, key=group_of.get):
            if pairs_stay_connected(graph, pairs, removed | {v}):
                removed.add(v)
        return set(group_nodes) - removed

    kept = min((build(pairs[i:] + pairs[:i]) for i in range(len(pairs))), key=len)
    reserve = np.zeros(len(group_nodes), bool)
    reserve[[group_of[v] for v in kept]] = True
    return reserve


def _greedy_pairs(graph: SearchGraph, order: jax.Array, k: jax.Array) -> jax.Array:
    """Algorithm 3's greedy pass with every input-output pair's connectivity as validity. When
    it ends below ``k``, a second pass keeps ``removed`` plus the unvisited groups outside
    ``graph.reserve`` valid at every step, so it reaches ``min(k, max_removable)``."""
    n = graph.num_nodes
    pred = graph.pred[:n]
    preds = jnp.asarray(np.where(pred == n, -1, pred))
    column, target = jnp.asarray(graph.source_column), jnp.asarray(graph.pair_target)
    pair_column = jnp.asarray(graph.pair_column)
    group_node = jnp.asarray(graph.group_node)
    reserve = jnp.asarray(graph.reserve)
    num = graph.num_groups

    def valid(removed):
        dead = jnp.zeros(n, bool).at[group_node].set(removed)
        return pairs_connected(preds, column, dead, target, pair_column, graph.num_sources)

    def first(c):
        i, count, removed = c
        trial = removed.at[order[i]].set(True)
        ok = valid(trial)
        return i + 1, count + ok.astype(jnp.int32), jnp.where(ok, trial, removed)

    def second(c):
        i, count, removed, unvisited = c
        g = order[i]
        unvisited = unvisited.at[g].set(False)
        trial = removed.at[g].set(True)
        ok = ~reserve[g] | valid(trial | (unvisited & ~reserve))
        return (i + 1, count + ok.astype(jnp.int32), jnp.where(ok, trial, removed), unvisited)

    def go_on(c):
        return (c[0] < num) & (c[1] < k)

    _, count, removed = jax.lax.while_loop(
        go_on, first, (jnp.int32(0), jnp.int32(0), jnp.zeros(num, bool)))
    return jax.lax.cond(
        count >= k, lambda: removed,
        lambda: jax.lax.while_loop(go_on, second, (jnp.int32(0), jnp.int32(0),
                                                   jnp.zeros(num, bool), jnp.ones(num, bool)))[2])


def _greedy_valid(graph: SearchGraph, order: jax.Array, k: jax.Array):
    """Algorithm 3's greedy pass. Returns (removed mask, number removed)."""
    n = graph.num_nodes
    succ, pred = jnp.asarray(graph.succ), jnp.asarray(graph.pred)
    es, ed = jnp.asarray(graph.edge_src), jnp.asarray(graph.edge_dst)
    group_node = jnp.asarray(graph.group_node)
    is_source = jnp.asarray(graph.is_source)
    out = graph.output

    def peel_one(c):
        useful, fcnt, bcnt, stack, top = c
        top = top - 1
        u = stack[top]
        ws, ps = succ[u], pred[u]
        aw, ap = useful[ws], useful[ps]  # the dummy n is never useful
        fcnt = fcnt.at[ws].add(-aw.astype(jnp.int32))
        bcnt = bcnt.at[ps].add(-ap.astype(jnp.int32))
        dw = aw & (fcnt[ws] == 0) & ~is_source[ws]
        dp = ap & (bcnt[ps] == 0) & (ps != out)
        cand = jnp.concatenate([ws, ps])  # disjoint in a DAG
        dead = jnp.concatenate([dw, dp])
        useful = useful.at[jnp.where(dead, cand, n)].set(False)
        slot = jnp.where(dead, top + jnp.cumsum(dead) - 1, n)
        stack = stack.at[slot].set(cand)
        return useful, fcnt, bcnt, stack, top + jnp.sum(dead, dtype=jnp.int32)

    def visit(c):
        i, count, removed, useful, fcnt, bcnt, stack = c
        g = order[i]
        v = group_node[g]
        in_u = useful[v]
        cross = jnp.sum(useful[es] & useful[ed] & (es < v) & (v < ed))
        accept = ~in_u | (cross > 0)
        peel = accept & in_u
        useful = useful.at[v].set(in_u & ~peel)
        stack = stack.at[0].set(v)
        useful, fcnt, bcnt, stack, _ = jax.lax.while_loop(
            lambda s: s[-1] > 0, peel_one, (useful, fcnt, bcnt, stack, peel.astype(jnp.int32)))
        removed = removed.at[g].set(accept)
        return i + 1, count + accept.astype(jnp.int32), removed, useful, fcnt, bcnt, stack

    init = (jnp.int32(0), jnp.int32(0), jnp.zeros(graph.num_groups, bool),
            jnp.asarray(graph.useful), jnp.asarray(graph.useful_preds),
            jnp.asarray(graph.useful_succs), jnp.zeros(n + 1, jnp.int32))
    c = jax.lax.while_loop(lambda c: (c[0] < graph.num_groups) & (c[1] < k), visit, init)
    return c[2], c[1]


def _greedy_feasible(graph: SearchGraph, order: jax.Array, k: jax.Array) -> jax.Array:
    """Greedy pass that also keeps ``k`` reachable: a candidate is accepted only if an
    input-output path with at most ``G - k`` groups survives (then the groups off that path
    complete the set). Identical to :func:`_greedy_valid` whenever that one reaches ``k``."""
    n = graph.num_nodes
    succ, pred = jnp.asarray(graph.succ), jnp.asarray(graph.pred)
    es, ed = jnp.asarray(graph.edge_src), jnp.asarray(graph.edge_dst)
    group_node = jnp.asarray(graph.group_node)
    is_source, weight = jnp.asarray(graph.is_source), jnp.asarray(graph.weight)
    out = graph.output
    budget = graph.num_groups - k

    def fixpoint(step, d):
        def body(c):
            d, _ = c
            new = step(d)
            return new, jnp.any(new != d)
        return jax.lax.while_loop(lambda c: c[1], body, (d, jnp.bool_(True)))[0]

    def recompute(alive, ds, dt):
        def step_ds(d):
            m = jnp.min(d[pred], axis=1)
            new = jnp.where(is_source, weight, jnp.minimum(weight + m, INF))
            return jnp.where(alive, new, INF)

        def step_dt(d):
            m = jnp.min(d[succ], axis=1)
            new = jnp.where(jnp.arange(n + 1) == out, weight, jnp.minimum(weight + m, INF))
            return jnp.where(alive, new, INF)

        return fixpoint(step_ds, ds), fixpoint(step_dt, dt)

    def visit(c):
        i, count, removed, alive, ds, dt = c
        g = order[i]
        v = group_node[g]
        on_path = (ds[v] < INF) & (dt[v] < INF)
        best = jnp.min(jnp.where((es < v) & (v < ed), ds[es] + dt[ed], 2 * INF), initial=2 * INF)
        accept = ~on_path | (best <= budget)
        cut = accept & on_path
        alive = alive.at[v].set(alive[v] & ~cut)
        ds, dt = jax.lax.cond(cut, recompute, lambda a, s, t: (s, t), alive, ds, dt)
        removed = removed.at[g].set(accept)
        return i + 1, count + accept.astype(jnp.int32), removed, alive, ds, dt

    init = (jnp.int32(0), jnp.int32(0), jnp.zeros(graph.num_groups, bool),
            jnp.arange(n + 1) < n, jnp.asarray(graph.dist_from_input),
            jnp.asarray(graph.dist_to_output))
    return jax.lax.while_loop(lambda c: (c[0] < graph.num_groups) & (c[1] < k), visit, init)[2]


def search_order(saliency: jax.Array) -> jax.Array:
    """``int32[G]``: the groups by ascending saliency, ties in index order, the order in
    which every search visits them. Sorted by XLA, which compares subnormal numbers as zero
    (NumPy's sort does not): pass this order to :func:`host_hierarchical_search`."""
    return jnp.argsort(saliency, stable=True).astype(jnp.int32)


def hierarchical_search(graph: SearchGraph, saliency: jax.Array, k: jax.Array | int) -> jax.Array:
    """Algorithm 3, lines 3-10: the redundant set G_r as a boolean mask over groups.

    Groups are visited by ascending ``saliency`` (ties by index); one joins G_r if the removed
    set stays valid and |G_r| < K. K is capped at ``graph.max_removable``. When that greedy
    pass ends below K (it kept a path through many groups), the pass is redone accepting only
    candidates that keep K reachable, so |G_r| = min(K, max_removable) always; whenever the
    first pass reaches K the two agree. With several connected (input, output) pairs, validity
    is every pair's connectivity (:func:`_greedy_pairs`).

    Jittable. Time: O(G |E_s|) vectorised work plus an O(|V_s| + |E_s|) worklist for the first
    pass; the second pass, when needed, adds O(depth) vectorised rounds per acceptance.

    Args:
      graph: the static :class:`SearchGraph`.
      saliency: ``float[G]``, smaller = more redundant.
      k: the target number of redundant groups K.

    Returns:
      ``bool[G]``, True for the groups in G_r.
    """
    if graph.num_groups == 0:
        return jnp.zeros(0, bool)
    k = jnp.minimum(jnp.asarray(k, jnp.int32), graph.max_removable)
    order = search_order(saliency)
    if graph.reserve is not None:
        return _greedy_pairs(graph, order, k)
    removed, count = _greedy_valid(graph, order, k)
    return jax.lax.cond(count >= k, lambda: removed, lambda: _greedy_feasible(graph, order, k))


def _host_greedy(graph: SearchGraph, order: np.ndarray, k: int, accepts) -> tuple[np.ndarray, int]:
    """Visits the groups in ``order`` until ``k`` are accepted; ``accepts(g, removed)`` decides
    (and updates the caller's bookkeeping). Returns the removed mask and its size."""
    removed = np.zeros(graph.num_groups, bool)
    count = 0
    for g in order:
        if count >= k:
            break
        removed[g] = accepts(int(g), removed)
        count += int(removed[g])
    return removed, count


def _host_valid_pass(graph: SearchGraph, order: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """:func:`_greedy_valid` on the host (same acceptances, same peeling)."""
    n, out = graph.num_nodes, graph.output
    succ = [[w for w in row if w != n] for row in graph.succ.tolist()]
    pred = [[w for w in row if w != n] for row in graph.pred.tolist()]
    es, ed = graph.edge_src, graph.edge_dst
    useful = graph.useful.copy()
    fcnt, bcnt = graph.useful_preds.tolist(), graph.useful_succs.tolist()
    is_source = graph.is_source.tolist()

    def accepts(g: int, removed: np.ndarray) -> bool:
        v = int(graph.group_node[g])
        if not useful[v]:
            return True
        if not np.any(useful[es] & useful[ed] & (es < v) & (v < ed)):
            return False
        useful[v] = False
        stack = [v]
        while stack:  # peel what lost its last useful predecessor or successor
            u = stack.pop()
            for w in succ[u]:
                if useful[w]:
                    fcnt[w] -= 1
                    if fcnt[w] == 0 and not is_source[w]:
                        useful[w] = False
                        stack.append(w)
            for w in pred[u]:
                if useful[w]:
                    bcnt[w] -= 1
                    if bcnt[w] == 0 and w != out:
                        useful[w] = False
                        stack.append(w)
        return True

    return _host_greedy(graph, order, k, accepts)


def _host_distances(graph: SearchGraph, alive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fewest groups from an input to each alive segment and from it to the output (the
    fixpoint :func:`_greedy_feasible` iterates to, by one pass in topological order)."""
    n, w = graph.num_nodes, graph.weight
    ds = np.full(n + 1, INF, np.int64)
    dt = np.full(n + 1, INF, np.int64)
    for i in range(n):
        if alive[i]:
            ds[i] = w[i] if graph.is_source[i] else min(INF, w[i] + ds[graph.pred[i]].min())
    for i in reversed(range(n)):
        if alive[i]:
            dt[i] = w[i] if i == graph.output else min(INF, w[i] + dt[graph.succ[i]].min())
    return ds, dt


def _host_feasible_pass(graph: SearchGraph, order: np.ndarray, k: int) -> np.ndarray:
    """:func:`_greedy_feasible` on the host."""
    es, ed = graph.edge_src, graph.edge_dst
    budget = graph.num_groups - k
    alive = np.arange(graph.num_nodes + 1) < graph.num_nodes
    dist = [graph.dist_from_input.astype(np.int64), graph.dist_to_output.astype(np.int64)]

    def accepts(g: int, removed: np.ndarray) -> bool:
        ds, dt = dist
        v = int(graph.group_node[g])
        if ds[v] >= INF or dt[v] >= INF:  # on no input-output path
            return True
        jump = (es < v) & (v < ed)
        if (ds[es[jump]] + dt[ed[jump]]).min(initial=2 * INF) > budget:
            return False
        alive[v] = False
        dist[:] = _host_distances(graph, alive)
        return True

    return _host_greedy(graph, order, k, accepts)[0]


def _host_pairs(graph: SearchGraph, order: np.ndarray, k: int) -> np.ndarray:
    """:func:`_greedy_pairs` on the host; reachability as one integer bit set per segment."""
    n = graph.num_nodes
    preds = [[w for w in row if w != n] for row in graph.pred[:n].tolist()]
    seed = [1 << int(c) if c >= 0 else 0 for c in graph.source_column[:n]]
    targets = list(zip(graph.pair_target.tolist(), graph.pair_column.tolist()))

    def valid(removed: np.ndarray) -> bool:
        dead = np.zeros(n, bool)
        dead[graph.group_node[removed]] = True
        reach = [0] * n
        for i in range(n):
            if not dead[i]:
                r = seed[i]
                for p in preds[i]:
                    r |= reach[p]
                reach[i] = r
        return all(reach[t] >> c & 1 for t, c in targets)

    def with_g(removed: np.ndarray, g: int) -> np.ndarray:
        trial = removed.copy()
        trial[g] = True
        return trial

    removed, count = _host_greedy(graph, order, k, lambda g, r: valid(with_g(r, g)))
    if count >= k:
        return removed
    unvisited = np.ones(graph.num_groups, bool)

    def keeps_k_reachable(g: int, removed: np.ndarray) -> bool:
        unvisited[g] = False
        return not graph.reserve[g] or valid(with_g(removed, g) | (unvisited & ~graph.reserve))

    return _host_greedy(graph, order, k, keeps_k_reachable)[0]


def host_hierarchical_search(graph: SearchGraph, order: np.ndarray, k: int) -> np.ndarray:
    """:func:`hierarchical_search` in NumPy, given the visiting ``order`` (the groups by
    ascending saliency, as :func:`search_order` gives it): the same redundant set, on the
    host."""
    order = np.asarray(order, np.int64)
    k = min(int(k), graph.max_removable)
    if graph.reserve is not None:
        return _host_pairs(graph, order, k)
    removed, count = _host_valid_pass(graph, order, k)
    return removed if count >= k else _host_feasible_pass(graph, order, k)


def hierarchical_search_callback(graph: SearchGraph, saliency: jax.Array,
                                 k: jax.Array | int) -> jax.Array:
    """:func:`hierarchical_search` (the same result) with the greedy passes on the host, through
    one ``jax.pure_callback`` (:func:`host_hierarchical_search`): a program that calls this
    compiles no search loops, so H2SPG's train step compiles faster.

    Works under ``jit``, ``pmap`` and sharding (each device calls the host with the same
    saliency); under ``vmap`` the callback runs once per batch element.
    """
    if graph.num_groups == 0:
        return jnp.zeros(0, bool)
    order = search_order(saliency)

    def host(order, k):
        return host_hierarchical_search(graph, np.asarray(order), int(k))

    return jax.pure_callback(host, jax.ShapeDtypeStruct((graph.num_groups,), jnp.bool_),
                             order, jnp.asarray(k, jnp.int32), vmap_method="sequential")


def top_k_search(num_groups: int, saliency: jax.Array, k: jax.Array | int) -> jax.Array:
    """The ``k`` groups of smallest ``saliency`` as a mask, with no validity check (DHSPG)."""
    rank = jnp.argsort(search_order(saliency), stable=True)
    return rank < jnp.minimum(jnp.asarray(k, jnp.int32), num_groups)
