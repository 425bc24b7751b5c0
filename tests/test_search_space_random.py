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

SETTINGS = settings(max_examples=36, deadline=None,
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
    # groups (whole leaves or slices of scanned stacks) and G_s^C partition the trainable
    # entries: no slice in two groups, no leaf both whole in a group and sliced
    owned = [(sl.leaf, sl.axis, j) for gr in space.groups for sl in gr.slices
             for j in (sl.indices or (None,))]
    assert len(owned) == len(set(owned))
    whole = {leaf for leaf, axis, _ in owned if axis is None}
    assert not whole & {leaf for leaf, axis, _ in owned if axis is not None}
    touched = {leaf for leaf, _, _ in owned}
    assert sorted(touched | set(space.complement_leaves)) == [
        i for i, tr in enumerate(t.trainable) if tr]
    assert not touched & set(space.complement_leaves)
    maps = space.leaf_group_maps(space.variables)
    sizes = {gr.index: 0 for gr in space.groups}
    for m, x in zip(maps, jax.tree_util.tree_leaves(space.variables)):
        for j, g in enumerate(m.ids):
            if g >= 0:
                sizes[int(g)] += x.size // (1 if m.axis is None else x.shape[m.axis])
    assert sizes == {gr.index: gr.num_params for gr in space.groups}


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
    mine = {sl.leaf: sl for sl in space.groups[0].slices}
    for i, (a, b) in enumerate(zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(z))):
        a, b = np.asarray(a), np.asarray(b)
        sl = mine.get(i)
        if sl is None:
            assert np.array_equal(a, b)
        elif sl.axis is None:
            assert not np.any(b)
        else:  # its slices (one layer of a scanned stack) are zero, the other layers intact
            inside = np.isin(np.arange(a.shape[sl.axis]), sl.indices)
            assert not np.any(np.compress(inside, b, axis=sl.axis))
            assert np.array_equal(np.compress(~inside, a, axis=sl.axis),
                                  np.compress(~inside, b, axis=sl.axis))
