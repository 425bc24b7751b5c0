"""Validity for every input and output: each connected (input leaf, output leaf) pair stays
connected, in ``is_valid``, ``is_valid_mask`` and H2SPG's in-graph search."""

from __future__ import annotations

import itertools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import asgssd_jax as ag
from asgssd_jax.optim.h2spg import SparsityWarning, search_graph
from asgssd_jax.optim.search import (
    SearchGraph,
    hierarchical_search,
    host_hierarchical_search,
    search_order,
)


class TwoHeads(nn.Module):
    """A trunk and two heads, each head the sum of two Dense branches."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(8, name="stem")(x))
        cls = nn.Dense(3, name="cls1")(h) + nn.Dense(3, name="cls2")(h)
        box = nn.Dense(4, name="box1")(h) + nn.Dense(4, name="box2")(h)
        return {"cls": cls, "box": box}


class WithActivations(nn.Module):
    """Logits returned next to an intermediate activation."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(8, name="stem")(x))
        logits = nn.Dense(3, name="b1")(h) + nn.Dense(3, name="b2")(h)
        return logits, [h]


class ImageAndTimestep(nn.Module):
    """A second input (a timestep) joins through a Dense embedding added to the features."""

    @nn.compact
    def __call__(self, x, t):
        h = nn.Dense(8, name="stem")(x)
        h = h + nn.Dense(8, name="temb")(t)
        h = h + nn.Dense(8, name="block")(nn.relu(h))
        return nn.Dense(2, name="head")(h)


def _space(module, *args):
    v = module.init(jax.random.key(0), *args)
    return ag.generate_search_space(module.apply, v, *args)


def _index(space, name):
    (i,) = [g.index for g in space.groups if any(f"/{name}/" in p for p in g.param_paths)]
    return i


def _check_all_subsets(space, expected):
    """is_valid and is_valid_mask agree with ``expected(subset)`` on every subset."""
    check = jax.jit(space.is_valid_mask)
    n = space.num_groups
    for r in range(n + 1):
        for subset in itertools.combinations(range(n), r):
            want = expected(set(subset))
            assert space.is_valid(subset) == want, subset
            mask = np.zeros(n, bool)
            mask[list(subset)] = True
            assert bool(check(mask)) == want, subset


def _search(space, saliency, k):
    graph = search_graph(space)
    removed = np.flatnonzero(jax.jit(hierarchical_search, static_argnums=0)(
        graph, jnp.asarray(saliency, jnp.float32), k))
    return graph, list(removed)


def test_two_heads_each_keep_depending_on_the_input():
    space = _space(TwoHeads(), jnp.ones((2, 5)))
    c1, c2, b1, b2 = (_index(space, n) for n in ("cls1", "cls2", "box1", "box2"))
    assert len(space.io_pairs) == 2
    _check_all_subsets(space, lambda s: not {c1, c2} <= s and not {b1, b2} <= s)
    # the search prefers box1 and box2 but may only take one of them
    saliency = np.zeros(4)
    saliency[[c1, c2]] = 1.0
    graph, removed = _search(space, saliency, 2)
    assert graph.max_removable == 2
    assert len(removed) == 2 and space.is_valid(removed)
    assert len(set(removed) & {b1, b2}) == 1


def test_intermediate_activations_do_not_make_the_logits_removable():
    space = _space(WithActivations(), jnp.ones((2, 5)))
    b1, b2 = _index(space, "b1"), _index(space, "b2")
    assert not space.is_valid([b1, b2])  # the logits would no longer depend on the input
    assert space.is_valid([b1]) and space.is_valid([b2])
    graph, removed = _search(space, [0.0, 0.0], 2)
    assert graph.max_removable == 1 and len(removed) == 1


def test_a_second_input_stays_connected():
    x, t = jnp.ones((2, 5)), jnp.ones((2, 3))
    space = _space(ImageAndTimestep(), x, t)
    stem, temb, block = (_index(space, n) for n in ("stem", "temb", "block"))
    # stem and temb each carry one input into the sum: removing either disconnects it
    _check_all_subsets(space, lambda s: not s & {stem, temb})
    graph, removed = _search(space, [0.0, 0.0, 0.0], 2)
    assert graph.max_removable == 1 and removed == [block]
    # H2SPG caps K and says why
    v = ImageAndTimestep().init(jax.random.key(0), x, t)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ag.h2spg(space, 0.1, 0.99, warmup_steps=1, projection_steps=1).init(v["params"])
    assert any(issubclass(x.category, SparsityWarning) for x in w)


@pytest.mark.parametrize("k", [1, 2])
def test_single_input_and_output_is_algorithm_3(k):
    class Chain(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(4, name="stem")(x)
            h = h + nn.Dense(4, name="a")(h)
            h = h + nn.Dense(4, name="b")(h)
            return nn.Dense(2, name="head")(h)

    space = _space(Chain(), jnp.ones((2, 5)))
    assert len(space.io_pairs) == 1 and search_graph(space).reserve is None
    _check_all_subsets(space, lambda s: True)  # residual branches: every subset is valid
    graph, removed = _search(space, [0.0, 1.0], k)
    assert removed == list(range(k))


def _connected(graph, pairs, removed):
    g = graph.copy()
    g.remove_nodes_from(removed)
    return all(nx.has_path(g, s, t) for s, t in pairs)


@settings(max_examples=8, deadline=None)
@given(st.randoms(use_true_random=False))
def test_search_on_random_graphs_with_several_pairs(rnd):
    n = 12
    graph = nx.DiGraph()
    graph.add_nodes_from(range(n))
    for i in range(n):
        for j in range(max(i + 1, 2), min(i + 5, n)):  # nodes 0 and 1 are the inputs
            if rnd.random() < 0.5:
                graph.add_edge(i, j)
    pairs = [(s, t) for s in (0, 1) for t in (n - 2, n - 1)
             if t in nx.descendants(graph, s)]
    if len(pairs) < 2:
        return
    groups = sorted(rnd.sample(range(2, n - 2), 5))
    sg = SearchGraph.from_pairs(graph, pairs, groups)
    # removing every group outside the reserve is valid (the greedy construction may keep more
    # groups than the fewest possible, found here exhaustively)
    assert _connected(graph, pairs, [v for i, v in enumerate(groups) if not sg.reserve[i]])
    best = max(r for r in range(6) if any(
        _connected(graph, pairs, [groups[i] for i in subset])
        for subset in itertools.combinations(range(5), r)))
    assert 0 <= sg.max_removable <= best
    saliency = jnp.asarray([rnd.random() for _ in groups], jnp.float32)
    search = jax.jit(hierarchical_search, static_argnums=0)
    for k in (1, 3, 5):
        removed = np.flatnonzero(search(sg, saliency, k))
        order = np.asarray(search_order(saliency))
        np.testing.assert_array_equal(np.flatnonzero(host_hierarchical_search(sg, order, k)),
                                      removed)
        assert len(removed) == min(k, sg.max_removable)
        assert _connected(graph, pairs, [groups[i] for i in removed])
