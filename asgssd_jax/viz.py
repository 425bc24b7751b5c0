"""Pictures of the trace graph, the segment graph and the removal structures (Graphviz).

Each ``draw_*`` function returns a ``graphviz.Digraph``; ``save(graph, path)`` writes the DOT
source and, when Graphviz's ``dot`` program is installed, the rendered SVG/PNG/PDF beside it.
Removal structures are filled in colour; redundant ones (e.g. H2SPG's G_r or the zero groups)
are drawn grey and dashed, as in the paper's Figures 2-4.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from asgssd_jax.search_space import SearchSpace
from asgssd_jax.trace import TraceGraph

__all__ = ["draw_search_space", "draw_segment_graph", "draw_trace_graph", "has_dot", "save"]

_PALETTE = ["#a6cee3", "#b2df8a", "#fdbf6f", "#cab2d6", "#ffff99", "#fb9a99", "#8dd3c7",
            "#bebada", "#80b1d3", "#fccde5", "#ccebc5", "#ffed6f"]
_REDUNDANT = "#d9d9d9"


def _digraph(name: str):
    try:
        import graphviz
    except ImportError as e:  # pragma: no cover
        raise ImportError("drawing needs the 'graphviz' package: pip install 'asgssd-jax[viz]'")\
            from e
    g = graphviz.Digraph(name)
    g.attr(rankdir="TB", fontname="Helvetica", fontsize="10")
    g.attr("node", fontname="Helvetica", fontsize="9", style="filled", fillcolor="white")
    g.attr("edge", arrowsize="0.6")
    return g


def _shape_str(shape) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"


def _trace_label(trace: TraceGraph, v: int) -> str:
    vert = trace.vertices[v]
    if vert.kind == "input":
        return f"input\\n{_shape_str(vert.shape)}"
    if vert.kind == "output":
        return "output"
    return f"{vert.label}\\n{_shape_str(vert.shape)}"


def draw_trace_graph(
    graph: TraceGraph | SearchSpace, redundant: Iterable[int] = (), *, title: str | None = None
):
    """The trace graph; with a SearchSpace, vertices are coloured by removal structure."""
    space = graph if isinstance(graph, SearchSpace) else None
    trace = space.trace if space else graph
    redundant = set(redundant)
    color_of: dict[int, tuple[str, int]] = {}
    if space is not None:
        sg = space.segment_graph
        for gr in space.groups:
            for v in sg.segments[gr.segment].vertices:
                color_of[v] = (_PALETTE[gr.index % len(_PALETTE)], gr.index)
    g = _digraph("trace_graph")
    if title:
        g.attr(label=title, labelloc="t")
    for v, vert in trace.vertices.items():
        attrs: dict[str, Any] = {"shape": "box"}
        if vert.kind != "op" or trace.is_joint(v):
            attrs["shape"] = "ellipse"
        if v in color_of:
            col, gi = color_of[v]
            attrs["fillcolor"] = _REDUNDANT if gi in redundant else col
            if gi in redundant:
                attrs["style"] = "filled,dashed"
            attrs["xlabel"] = f"g{gi}"
        g.node(str(v), _trace_label(trace, v), **attrs)
    for a, b, d in trace.graph.edges(data=True):
        g.edge(str(a), str(b), **({"label": str(d["slots"])} if d.get("slots", 1) > 1 else {}))
    return g


def draw_segment_graph(space: SearchSpace, redundant: Iterable[int] = (), *,
                       title: str | None = None):
    """The segment graph (V_s, E_s): removal structures in colour, redundant ones grey."""
    sg = space.segment_graph
    redundant = set(redundant)
    g = _digraph("segment_graph")
    if title:
        g.attr(label=title, labelloc="t")
    for seg in sg.segments:
        attrs: dict[str, Any] = {"shape": "box"}
        gi = space.group_of_segment.get(seg.id)
        if seg.kind != "op":
            attrs["shape"] = "ellipse"
            label = seg.kind
        else:
            ops = [space.trace.vertices[v].label.replace("\\n", ": ") for v in seg.vertices]
            if len(ops) > 6:
                ops = ops[:3] + [f"... ({len(ops) - 5} more)"] + ops[-2:]
            label = "\\n".join(ops)
        if gi is not None:
            gr = space.groups[gi]
            label = f"g{gi}  ({gr.num_params:,} params)\\n" + label
            attrs["fillcolor"] = _REDUNDANT if gi in redundant else _PALETTE[gi % len(_PALETTE)]
            if gi in redundant:
                attrs["style"] = "filled,dashed"
        g.node(str(seg.id), label, **attrs)
    for a, b in sg.graph.edges:
        g.edge(str(a), str(b))
    return g


def draw_search_space(space: SearchSpace, redundant: Iterable[int] = (), **kw):
    """Alias of :func:`draw_segment_graph` with removal structures marked."""
    return draw_segment_graph(space, redundant, **kw)


def has_dot() -> bool:
    """Whether Graphviz's ``dot`` program is installed (needed to render, not to draw)."""
    return shutil.which("dot") is not None


def save(graph, path: str | Path, fmt: str | None = None) -> Path:
    """Writes ``graph``'s DOT source to ``path`` with suffix .dot and, if ``dot`` is installed,
    renders it in ``fmt`` (default: ``path``'s suffix, else svg). Returns the rendered file, or
    the .dot file when ``dot`` is missing."""
    path = Path(path)
    fmt = fmt or (path.suffix[1:] if path.suffix and path.suffix != ".dot" else "svg")
    path.parent.mkdir(parents=True, exist_ok=True)
    dot_path = path.with_suffix(".dot")
    dot_path.write_text(graph.source)
    if not has_dot():
        return dot_path
    out = path.with_suffix("." + fmt)
    out.write_bytes(graph.pipe(format=fmt))
    return out
