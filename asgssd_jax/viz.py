"""Pictures of the trace graph, the segment graph and the removal structures.

Each ``draw_*`` function returns a :class:`Drawing`; ``save(drawing, path)`` writes its DOT
source and the picture beside it: rendered by Graphviz's ``dot`` program when it is installed,
otherwise by a layered layout drawn with matplotlib, so that a machine with only what pip
installs still gets SVG/PNG pictures. ``render(dot_file)`` redraws a picture from the DOT file
``save`` wrote. Removal structures are filled in colour; redundant ones (e.g. H2SPG's G_r or
the zero groups) are drawn grey and dashed, as in the paper's Figures 2-4. Operations are named
as a researcher reads them (ReLU, BatchNorm, AvgPool), with their Flax module path.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import networkx as nx

from asgssd_jax.naming import operation_name
from asgssd_jax.search_space import SearchSpace
from asgssd_jax.trace import TraceGraph

__all__ = ["Drawing", "draw_search_space", "draw_segment_graph", "draw_trace_graph", "has_dot",
           "operation_name", "read_dot", "render", "save"]

_PALETTE = ["#a6cee3", "#b2df8a", "#fdbf6f", "#cab2d6", "#ffff99", "#fb9a99", "#8dd3c7",
            "#bebada", "#80b1d3", "#fccde5", "#ccebc5", "#ffed6f"]
_REDUNDANT = "#d9d9d9"


@dataclasses.dataclass
class Drawing:
    """A directed graph to draw: node and edge attributes in Graphviz's vocabulary (``label``,
    ``shape`` box/ellipse, ``fillcolor``, ``style``, ``xlabel``), ``rankdir`` TB or LR.
    ``source`` is its DOT text."""

    name: str
    title: str | None = None
    rankdir: str = "TB"
    nodes: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    edges: list[tuple[str, str, dict[str, str]]] = dataclasses.field(default_factory=list)

    def node(self, id: Any, label: str, **attrs: str) -> None:
        self.nodes[str(id)] = {"label": label, **attrs}

    def edge(self, a: Any, b: Any, **attrs: str) -> None:
        self.edges.append((str(a), str(b), attrs))

    @property
    def source(self) -> str:
        lines = [f"digraph {self.name} {{",
                 f"\tgraph [fontname=Helvetica fontsize=10 rankdir={self.rankdir} "
                 "ranksep=0.25 nodesep=0.2]",
                 "\tnode [fontname=Helvetica fontsize=9 style=filled fillcolor=white "
                 "margin=\"0.08,0.03\"]",
                 "\tedge [arrowsize=0.6]"]
        if self.title:
            lines.append(f"\tlabel={_quote(self.title)} labelloc=t")
        for id, attrs in self.nodes.items():
            lines.append(f"\t{id} [{_attrs(attrs)}]")
        for a, b, attrs in self.edges:
            lines.append(f"\t{a} -> {b}" + (f" [{_attrs(attrs)}]" if attrs else ""))
        lines.append("}")
        return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace('"', '\\"') + '"'


def _attrs(attrs: dict[str, str]) -> str:
    return " ".join(f"{k}={_quote(str(v))}" for k, v in attrs.items())


_STATEMENT = re.compile(r"^\t(\w+)(?: -> (\w+))?(?: \[(.*)\])?$")
_ATTR = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def read_dot(text: str) -> Drawing:
    """The :class:`Drawing` whose ``source`` is ``text`` (the DOT that :func:`save` writes;
    not a general DOT parser)."""
    head = re.match(r"digraph (\w+) \{", text)
    if head is None:
        raise ValueError("not a DOT file written by asgssd_jax.viz.save (no 'digraph NAME {')")
    rankdir = re.search(r"rankdir=(\w+)", text)
    title = re.search(r'^\tlabel=("(?:[^"\\]|\\.)*") labelloc=t$', text, re.M)
    drawing = Drawing(head.group(1), _unquote(title.group(1)[1:-1]) if title else None,
                      rankdir.group(1) if rankdir else "TB")
    for line in text.splitlines():
        m = _STATEMENT.match(line)
        if m is None or m.group(1) in ("graph", "node", "edge", "label"):
            continue
        attrs = {k: _unquote(v) for k, v in _ATTR.findall(m.group(3) or "")}
        if m.group(2) is None:
            drawing.nodes[m.group(1)] = attrs
        else:
            drawing.edges.append((m.group(1), m.group(2), attrs))
    return drawing


def _unquote(text: str) -> str:
    return text.replace('\\"', '"')


# -- names of operations ---------------------------------------------------------------------
def _module_prefix(trace: TraceGraph) -> str:
    """The outer module every op vertex is inside (``DemoNet`` when a model is called inside
    another function, as a sub-network is), or ''."""
    mods = [v.module for v in trace.vertices.values() if v.kind == "op"]
    first = {m.split("/", 1)[0] for m in mods}
    if len(first) == 1 and "" not in first and any("/" in m for m in mods):
        return first.pop()
    return ""


def _shape_str(shape) -> str:
    """Without the batch dimension (the sample's), e.g. ``28x28x64``."""
    shape = tuple(shape)[1:] if len(shape) > 1 else tuple(shape)
    return "x".join(str(d) for d in shape) if shape else "scalar"


def _vertex_text(trace: TraceGraph, v: int, prefix: str) -> str:
    vert = trace.vertices[v]
    name = operation_name(trace, v)
    module = vert.module
    if prefix and (module == prefix or module.startswith(prefix + "/")):
        module = module[len(prefix) + 1:]
    return f"{module}: {name}" if module and vert.kind == "op" else name


def draw_trace_graph(
    graph: TraceGraph | SearchSpace, redundant: Iterable[int] = (), *, title: str | None = None
) -> Drawing:
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
    prefix = _module_prefix(trace)
    g = Drawing("trace_graph", title)
    for v, vert in trace.vertices.items():
        attrs: dict[str, str] = {"shape": "box"}
        if vert.kind != "op" or trace.is_joint(v):
            attrs["shape"] = "ellipse"
        if v in color_of:
            col, gi = color_of[v]
            attrs["fillcolor"] = _REDUNDANT if gi in redundant else col
            if gi in redundant:
                attrs["style"] = "filled,dashed"
            attrs["xlabel"] = f"g{gi}"
        text = _vertex_text(trace, v, prefix)
        if vert.kind != "output":  # one line a vertex keeps the picture short
            text += f"  {_shape_str(vert.shape)}"
        g.node(v, text, **attrs)
    for a, b, d in trace.graph.edges(data=True):
        g.edge(a, b, **({"label": str(d["slots"])} if d.get("slots", 1) > 1 else {}))
    return g


def draw_segment_graph(space: SearchSpace, redundant: Iterable[int] = (), *,
                       title: str | None = None) -> Drawing:
    """The segment graph (V_s, E_s): removal structures in colour, redundant ones grey."""
    sg = space.segment_graph
    redundant = set(redundant)
    prefix = _module_prefix(space.trace)
    g = Drawing("segment_graph", title)
    for seg in sg.segments:
        attrs: dict[str, str] = {"shape": "box"}
        gi = space.group_of_segment.get(seg.id)
        if seg.kind != "op":
            attrs["shape"] = "ellipse"
            label = seg.kind
        else:
            ops = [_vertex_text(space.trace, v, prefix) for v in seg.vertices]
            if len(ops) > 6:
                ops = ops[:3] + [f"... ({len(ops) - 5} more)"] + ops[-2:]
            label = "\\n".join(ops)
        if gi is not None:
            gr = space.groups[gi]
            label = f"g{gi}  ({gr.num_params:,} params)\\n" + label
            attrs["fillcolor"] = _REDUNDANT if gi in redundant else _PALETTE[gi % len(_PALETTE)]
            if gi in redundant:
                attrs["style"] = "filled,dashed"
        g.node(seg.id, label, **attrs)
    for a, b in sg.graph.edges:
        g.edge(a, b)
    return g


def draw_search_space(space: SearchSpace, redundant: Iterable[int] = (), **kw) -> Drawing:
    """Alias of :func:`draw_segment_graph` with removal structures marked."""
    return draw_segment_graph(space, redundant, **kw)


def has_dot() -> bool:
    """Whether Graphviz's ``dot`` program is installed (else matplotlib draws the pictures)."""
    return shutil.which("dot") is not None


def has_renderer() -> bool:
    """Whether pictures can be rendered here: ``dot``, or matplotlib for the fallback."""
    if has_dot():
        return True
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def save(drawing: Drawing, path: str | Path, fmt: str | None = None) -> Path:
    """Writes ``drawing``'s DOT source to ``path`` with suffix .dot and renders it in ``fmt``
    (default: ``path``'s suffix, else svg) with :func:`render`. Returns the picture, or the
    .dot file when neither ``dot`` nor matplotlib is installed."""
    path = Path(path)
    fmt = fmt or (path.suffix[1:] if path.suffix and path.suffix != ".dot" else "svg")
    path.parent.mkdir(parents=True, exist_ok=True)
    dot_path = path.with_suffix(".dot")
    dot_path.write_text(drawing.source)
    return render(dot_path, fmt) or dot_path


def render(dot_path: str | Path, fmt: str = "svg") -> Path | None:
    """Renders a DOT file written by :func:`save` to the same name with suffix ``fmt``: with
    Graphviz's ``dot`` when installed, else with matplotlib (a layered layout). Returns the
    picture, or None when neither is installed."""
    dot_path = Path(dot_path)
    out = dot_path.with_suffix("." + fmt)
    if has_dot():
        subprocess.run(["dot", f"-T{fmt}", str(dot_path), "-o", str(out)], check=True,
                       capture_output=True)
        return out
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    _draw_with_matplotlib(read_dot(dot_path.read_text()), out, fmt)
    return out


# -- the fallback renderer: a layered layout drawn with matplotlib -----------------------------
_CHAR_W, _LINE_H = 0.068, 0.15  # inches per character and per line at 8 pt
_GAP_ALONG, _GAP_ACROSS = 0.28, 0.18  # inches between layers and between neighbours


def _layers(drawing: Drawing) -> tuple[list[list[str]], list[list[str]]]:
    """Nodes in layers (longest path from a source, then each node moved down to just above
    its first successor), with a virtual node on every layer an
    edge crosses (so that edges never run through boxes), ordered within each layer by the
    mean position of their neighbours (the barycentre heuristic, down and up twice), each
    sweep O(|V| + |E|). Returns the layers and, per edge, the nodes it passes through."""
    g = nx.DiGraph()
    g.add_nodes_from(drawing.nodes)
    g.add_edges_from((a, b) for a, b, _ in drawing.edges)
    rank = {n: k for k, layer in enumerate(nx.topological_generations(g)) for n in layer}
    for n in reversed(list(nx.topological_sort(g))):  # down next to the successors: short edges
        if g.in_degree(n) and g.out_degree(n):
            rank[n] = min(rank[m] for m in g.successors(n)) - 1
    layers: list[list[str]] = [[] for _ in range(max(rank.values(), default=-1) + 1)]
    for n in drawing.nodes:
        layers[rank[n]].append(n)
    routes = []
    for i, (a, b, _) in enumerate(drawing.edges):
        route = [a]
        for k in range(rank[a] + 1, rank[b]):
            layers[k].append(f" {i}.{k}")  # a space: never a DOT node id
            route.append(f" {i}.{k}")
        routes.append(route + [b])
    above: dict[str, list[str]] = {n: [] for layer in layers for n in layer}
    below: dict[str, list[str]] = {n: [] for layer in layers for n in layer}
    for route in routes:
        for u, v in zip(route, route[1:]):
            below[u].append(v)
            above[v].append(u)
    for _ in range(2):
        for order, neighbours in ((range(1, len(layers)), above),
                                  (range(len(layers) - 2, -1, -1), below)):
            for k in order:
                pos = {n: i for layer in layers for i, n in enumerate(layer)}
                layers[k].sort(key=lambda n: sum(pos[m] for m in neighbours[n])
                               / len(neighbours[n]) if neighbours[n] else pos[n])
    return layers, routes


def _box_size(label: str) -> tuple[float, float]:
    lines = label.split("\\n")
    return (max(len(s) for s in lines) * _CHAR_W + 0.16, len(lines) * _LINE_H + 0.1)


def _draw_with_matplotlib(drawing: Drawing, out: Path, fmt: str) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    layers, routes = _layers(drawing)
    size = {n: _box_size(a.get("label", n)) for n, a in drawing.nodes.items()}
    size.update({n: (0.05, 0.05) for layer in layers for n in layer if n not in size})
    lr = drawing.rankdir == "LR"
    # along: the axis the edges point along; across: the axis of a layer's nodes
    along_extent = [max(size[n][0 if lr else 1] for n in layer) for layer in layers]
    centre: dict[str, tuple[float, float]] = {}
    spans = [sum(size[n][1 if lr else 0] for n in layer) + _GAP_ACROSS * (len(layer) - 1)
             for layer in layers]
    width_across = max(spans, default=1.0)
    t = 0.0
    for layer, extent, span in zip(layers, along_extent, spans):
        s = (width_across - span) / 2
        for n in layer:
            w = size[n][1 if lr else 0]
            along, across = t + extent / 2, s + w / 2
            centre[n] = (along, across) if lr else (across, -along)
            s += w + _GAP_ACROSS
        t += extent + _GAP_ALONG
    length = t - _GAP_ALONG
    title_h = 0.35 if drawing.title else 0.0
    margin = 0.15
    fig_w = (length if lr else width_across) + 2 * margin
    fig_h = (width_across if lr else length) + 2 * margin + title_h
    fig = plt.figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    if lr:
        ax.set_xlim(-margin, fig_w - margin)
        ax.set_ylim(width_across + margin, -margin - title_h)  # layers' nodes top down
    else:
        ax.set_xlim(-margin, fig_w - margin)
        ax.set_ylim(-length - margin, margin + title_h)
    patches = {}
    for n, attrs in drawing.nodes.items():
        (x, y), (w, h) = centre[n], size[n]
        dashed = "dashed" in attrs.get("style", "")
        box = FancyBboxPatch(
            (x - w / 2, y - h / 2), w, h,
            boxstyle="round,pad=0,rounding_size=0.12" if attrs.get("shape") == "ellipse"
            else "square,pad=0",
            fc=attrs.get("fillcolor", "white"), ec="black", lw=0.8,
            ls="--" if dashed else "-", zorder=2)
        ax.add_patch(box)
        patches[n] = box
        ax.text(x, y, attrs.get("label", n).replace("\\n", "\n"), ha="center", va="center",
                fontsize=8, family="sans-serif", zorder=3, linespacing=1.1)
        if attrs.get("xlabel"):
            top = y - h / 2 if lr else y + h / 2  # the y axis points down in LR
            ax.text(x - w / 2, top, attrs["xlabel"], ha="right", va="bottom", fontsize=7,
                    color="#555555", zorder=3)
    for (a, b, attrs), route in zip(drawing.edges, routes):
        points = [centre[n] for n in route]
        if len(points) > 2:  # under the boxes from the tail's centre to the last bend
            ax.plot(*zip(*points[:-1]), color="black", lw=0.7, zorder=1)
        ax.annotate("", xy=points[-1], xytext=points[-2], zorder=1,
                    arrowprops={"arrowstyle": "-|>", "lw": 0.7, "color": "black",
                                "patchA": patches[a] if len(points) == 2 else None,
                                "patchB": patches[b], "shrinkA": 1 if len(points) == 2 else 0,
                                "shrinkB": 1, "mutation_scale": 8})
        if attrs.get("label"):
            (xa, ya), (xb, yb) = points[0], points[1]
            ax.text((xa + xb) / 2, (ya + yb) / 2, attrs["label"], fontsize=7, zorder=3)
    if drawing.title:
        top = -margin - title_h / 2 if lr else margin + title_h / 2
        ax.text(fig_w / 2 - margin, top, drawing.title.replace("\\n", "\n"), ha="center",
                va="center", fontsize=10)
    fig.savefig(out, format=fmt, dpi=110)
    plt.close(fig)
