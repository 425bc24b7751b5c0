"""Property tests of Algorithm 2 on random DAG networks."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asgssd_jax as ag
from tests.archgen import init_random, random_network

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _space(net):
    module, shape = net
    v = init_random(module, shape)
    x = jnp.ones((2, *shape))
    return ag.generate_search_space(module.apply, v, x, train=False)


def _connected_without(space, removed_vertices) -> bool:
    """Every input still reaches every output leaf it reaches in the full trace graph."""
    t = space.trace
    full = t.graph
    g = full.copy()
    g.remove_nodes_from(removed_vertices)
    producers = list(full.predecessors(t.output))
    return all(nx.has_path(g, i, p) for i in t.inputs for p in producers
               if nx.has_path(full, i, p))


@SETTINGS
@given(random_network())
def test_segments_partition_and_structures_end_in_tolerant_joints(net):
    space = _space(net)
    sg, t = space.segment_graph, space.trace
    # the segments partition the trace vertices
    seen = [v for s in sg.segments for v in s.vertices]
    assert sorted(seen) == sorted(t.graph.nodes)
    # segments are chains: consecutive vertices joined by an edge, no joint after the head
    for s in sg.segments:
        for a, b in itertools.pairwise(s.vertices):
            assert t.graph.has_edge(a, b) and t.graph.in_degree(b) == 1
            assert t.graph.out_degree(a) == 1
    for gr in space.groups:
        tail = sg.segments[gr.segment].vertices[-1]
        succ = list(t.graph.successors(tail))
        assert succ and all(t.is_tolerant_joint(w) for w in succ)
        assert gr.leaves and all(t.trainable[i] for i in gr.leaves)
    # groups and G_s^C partition the trainable leaves
    grouped = [i for gr in space.groups for i in gr.leaves]
    assert len(grouped) == len(set(grouped))
    assert sorted(grouped + list(space.complement_leaves)) == [
        i for i, tr in enumerate(t.trainable) if tr]


@SETTINGS
@given(random_network(), st.randoms(use_true_random=False))
def test_is_valid_agrees_with_networkx_reachability(net, rnd):
    space = _space(net)
    sg = space.segment_graph
    n = space.num_groups
    subsets = [[], list(range(n))]
    subsets += [sorted(rnd.sample(range(n), rnd.randint(0, n))) for _ in range(6)] if n else []
    check = jax.jit(space.is_valid_mask)
    for subset in subsets:
        removed = [v for i in subset for v in sg.segments[space.groups[i].segment].vertices]
        expected = _connected_without(space, removed)
        assert space.is_valid(subset) == expected
        mask = np.zeros(max(n, 1), bool)[:n]
        mask[subset] = True
        assert bool(check(mask)) == expected


@SETTINGS
@given(random_network())
def test_zeroing_a_group_only_touches_its_leaves(net):
    module, shape = net
    space = _space(net)
    if not space.num_groups:
        return
    v = init_random(module, shape)
    z = space.zero_groups(v, [0])
    for path, a, b in zip(space.leaf_paths, jax.tree_util.tree_leaves(v),
                          jax.tree_util.tree_leaves(z)):
        if path in space.groups[0].param_paths:
            assert not np.any(np.asarray(b))
        else:
            assert np.array_equal(np.asarray(a), np.asarray(b))
