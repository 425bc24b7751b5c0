"""Pictures of the trace graph and the segment graph."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import pytest

import asgssd_jax as ag
import asgssd_zoo as models
from asgssd_jax import viz


@pytest.fixture(scope="module")
def space():
    m = models.create("demonet")
    x = jnp.ones((1, 28, 28, 1))
    return ag.generate_search_space(m.apply, m.init(jax.random.key(0), x), x)


@pytest.fixture
def no_dot(monkeypatch):
    """A machine with only what pip installs: no Graphviz ``dot`` on the PATH."""
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    assert not viz.has_dot()


def test_segment_graph_marks_structures_and_redundant_ones(space, tmp_path):
    g = viz.draw_segment_graph(space, redundant=[0, 1, 4], title="DemoNet")
    src = g.source
    assert src.count("g0  (18,496 params)") == 1
    assert src.count("filled,dashed") == 3  # the redundant ones
    assert "conv6/conv: Conv" in src
    out = viz.save(g, tmp_path / "segments.svg")
    assert out.exists() and (tmp_path / "segments.dot").exists()


def test_operations_have_the_names_a_researcher_reads(space):
    names = {viz.operation_name(space.trace, v) for v in space.trace.vertices}
    assert {"Conv", "BatchNorm", "ReLU", "MaxPool", "AvgPool", "Concat", "Dense",
            "Add, ReLU, Mean"} <= names
    assert not names & {"Max", "Sub-Mul-Add", "SumPool-div"}
    src = viz.draw_trace_graph(space).source
    assert "conv1/bn: BatchNorm  28x28x64" in src  # module, operation, shape without batch


def test_trace_graph_has_every_vertex(space):
    g = viz.draw_trace_graph(space)
    for v in space.trace.vertices:
        assert f"\t{v} [" in g.source
    assert g.source.count(" -> ") == space.trace.graph.number_of_edges()


def test_sub_network_picture_has_no_outer_module_prefix(space):
    m = models.create("demonet")
    x = jnp.ones((1, 28, 28, 1))
    variables = m.init(jax.random.key(0), x)
    sub = ag.construct_subnetwork(space, space.zero_groups(variables, [0, 3]))
    src = viz.draw_trace_graph(ag.trace(sub.apply, sub.variables, x)).source
    assert "conv1/conv: Conv" in src and "DemoNet/" not in src and "DemoNet:" not in src


def test_dot_source_reads_back(space):
    g = viz.draw_segment_graph(space, redundant=[1], title='a "quoted" title')
    back = viz.read_dot(g.source)
    assert back == g


def test_pictures_without_graphviz(space, tmp_path, no_dot):
    """matplotlib draws SVG and PNG when ``dot`` is missing; both are real pictures."""
    svg = viz.save(viz.draw_trace_graph(space, [0], title="DemoNet"), tmp_path / "t.svg")
    assert svg == tmp_path / "t.svg" and (tmp_path / "t.dot").exists()
    text = svg.read_text()
    assert "<svg" in text and "BatchNorm" in text
    png = viz.save(viz.draw_segment_graph(space), tmp_path / "s.png")
    assert png.read_bytes().startswith(b"\x89PNG")
    # redrawn from the DOT file alone
    svg.unlink()
    assert viz.render(tmp_path / "t.dot") == svg and svg.exists()


def test_trace_graph_picture_is_not_a_tower(space, tmp_path, no_dot):
    import matplotlib.image

    png = viz.save(viz.draw_trace_graph(space), tmp_path / "t.png")
    height, width = matplotlib.image.imread(png).shape[:2]
    assert height < 2.5 * width  # 29 vertices in 22 layers, one line each


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz 'dot' is not installed")
def test_renders_svg_with_dot(space, tmp_path):
    out = viz.save(viz.draw_segment_graph(space), tmp_path / "s.svg")
    assert out.suffix == ".svg" and out.read_text().lstrip().startswith("<?xml")
