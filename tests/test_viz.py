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


def test_segment_graph_marks_structures_and_redundant_ones(space, tmp_path):
    g = viz.draw_segment_graph(space, redundant=[0, 1, 4], title="DemoNet")
    src = g.source
    assert src.count("g0  (18,496 params)") == 1
    assert src.count("filled,dashed") == 3  # the redundant ones
    assert "conv6/conv" in src
    out = viz.save(g, tmp_path / "segments.svg")
    assert out.exists() and (tmp_path / "segments.dot").exists()


def test_trace_graph_has_every_vertex(space, tmp_path):
    g = viz.draw_trace_graph(space)
    for v in space.trace.vertices:
        assert f"\t{v} [" in g.source
    assert "28x28x64" in g.source


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz 'dot' is not installed")
def test_renders_svg_with_dot(space, tmp_path):
    out = viz.save(viz.draw_segment_graph(space), tmp_path / "s.svg")
    assert out.suffix == ".svg" and out.read_text().lstrip().startswith("<?xml")
