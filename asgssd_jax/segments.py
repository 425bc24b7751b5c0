"""Segment graph: Algorithm 2, lines 2-10, of the paper.

Segments are grown breadth-first from the vertices adjacent to the input; each segment grows
depth-first until it meets a joint vertex (two or more data inputs), which starts a new segment,
or a vertex with several outgoing edges, which ends it. Every trace vertex belongs to exactly one
segment. The input and output vertices form segments of their own.
"""

from __future__ import annotations

import dataclasses
from collections import deque

import networkx as nx

from asgssd_jax.trace import TraceGraph

__all__ = ["Segment", "SegmentGraph", "build_segment_graph"]


@dataclasses.dataclass(frozen=True, eq=False)
class Segment:
    """A chain of trace vertices: a candidate removal structure."""

    id: int
    kind: str  # "input" | "op" | "output"
    vertices: tuple[int, ...]  # trace-graph vertex ids, in chain order
    leaves: frozenset[int]  # indices of every variables leaf its vertices own


class SegmentGraph:
    """The graph (V_s, E_s) of segments.

    Attributes:
      graph: ``networkx.DiGraph`` over segment ids.
      segments: :class:`Segment` by id (ids in discovery order).
      trace: the :class:`TraceGraph` it partitions.
      segment_of: trace vertex id -> segment id.
      inputs, output: segment ids of the inputs and of the output.
    """

    def __init__(self, graph, segments, trace, segment_of, inputs, output):
        self.graph: nx.DiGraph = graph
        self.segments: list[Segment] = segments
        self.trace: TraceGraph = trace
        self.segment_of: dict[int, int] = segment_of
        self.inputs: list[int] = inputs
        self.output: int = output

    def __repr__(self) -> str:
        return (f"SegmentGraph(|V_s|={self.graph.number_of_nodes()}, "
                f"|E_s|={self.graph.number_of_edges()})")

    def label(self, s: int) -> str:
        seg = self.segments[s]
        if seg.kind != "op":
            return seg.kind
        t = self.trace
        return " -> ".join(t.vertices[v].label.replace("\\n", ":") for v in seg.vertices)


def build_segment_graph(trace: TraceGraph) -> SegmentGraph:
    """Algorithm 2, lines 2-10, in O(|V| + |E|).

    A joint vertex always heads a segment; a vertex with more than one outgoing edge (or the
    last vertex before a joint or the output) ends one.
    """
    g = trace.graph
    vertices = trace.vertices
    segment_of: dict[int, int] = {}
    segments: list[Segment] = []
    queue: deque[int] = deque()

    def add_segment(chain: list[int], kind: str) -> int:
        sid = len(segments)
        leaves = frozenset().union(*(vertices[v].leaves for v in chain))
        segments.append(Segment(sid, kind, tuple(chain), leaves))
        for v in chain:
            segment_of[v] = sid
        return sid

    inputs = [add_segment([v], "input") for v in trace.inputs]
    for v in trace.inputs:
        queue.extend(g.successors(v))
    while queue:
        head = queue.popleft()
        if head in segment_of:
            continue
        if head == trace.output:
            continue
        chain = [head]
        v = head
        while g.out_degree(v) == 1:
            (w,) = g.successors(v)
            if w in segment_of or w == trace.output or g.in_degree(w) >= 2:
                break
            chain.append(w)
            v = w
        add_segment(chain, "op")
        queue.extend(w for w in g.successors(v) if w not in segment_of)
    output = add_segment([trace.output], "output")

    sg = nx.DiGraph()
    sg.add_nodes_from(range(len(segments)))
    for seg in segments:
        tail = seg.vertices[-1]
        for w in g.successors(tail):
            sg.add_edge(seg.id, segment_of[w])
    return SegmentGraph(sg, segments, trace, segment_of, inputs, output)
