"""H2SPG (Algorithm 3) and its baselines as optax transformations."""

from __future__ import annotations

import functools
import itertools
import warnings

import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asgssd_jax as ag
import asgssd_zoo as models
from asgssd_jax.optim import (
    SearchGraph,
    hierarchical_search,
    host_hierarchical_search,
    search_order,
    top_k_search,
)
from tests.archgen import init_random, random_network

KEY = jax.random.key(0)
CONV2, CONV3, CONV45, CONV7, CONV8 = range(5)  # DemoNet's groups, in order


@pytest.fixture(scope="module")
def demo():
    net = models.create("demonet")
    x = jax.random.normal(jax.random.key(1), (4, *models.input_shape("demonet")))
    variables = net.init(KEY, x[:2])
    space = ag.generate_search_space(net.apply, variables, x[:2], train=False)
    return net, space, variables, x


def _synthetic_grads(params, step):
    """Deterministic per-leaf gradients of the parameters and the step (no model needed)."""
    return jax.tree_util.tree_map(lambda p: 0.1 * p + 0.05 * jnp.sin(37.0 * p + step), params)


@functools.cache
def _jitted_step(tx, grad_fn):
    @jax.jit
    def step(p, s, t):
        u, s = tx.update(grad_fn(p, t), s, p)
        return optax.apply_updates(p, u), s
    return step


def _run(tx, params, steps, grad_fn=_synthetic_grads, state=None, start=0):
    """``steps`` jitted updates from ``state`` (fresh if None); returns params and state."""
    state = tx.init(params) if state is None else state
    step = _jitted_step(tx, grad_fn)
    for t in range(start, start + steps):
        params, state = step(params, state, t)
    return params, state


def _zero_set(space, params) -> set[int]:
    return set(space.zero_group_indices(params))


def _redundant(state) -> set[int]:
    return set(np.flatnonzero(np.asarray(ag.h2spg_info(state).redundant)).tolist())


def _check_subnetwork_exact(space, variables, x):
    sub = ag.construct_subnetwork(space, variables)
    want = space.apply_fn(variables, x, **space.apply_kwargs)
    got = sub.apply(sub.variables, x, **space.apply_kwargs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# DemoNet: the paper's example.


def test_demonet_trains_to_exactly_k_valid_zero_groups_and_an_exact_subnetwork(demo):
    net, space, variables, x = demo
    y = jnp.arange(len(x)) % 10
    warm, proj = 3, 3
    tx = ag.h2spg(space, 0.05, 0.6, warmup_steps=warm, projection_steps=proj, fade_out=True)
    k = int(0.6 * space.num_groups)

    def grad_fn(p, t):
        def loss(p):
            out = net.apply({**variables, "params": p}, x, train=False)
            return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
        return jax.grad(loss)(p)

    params, state = _run(tx, variables["params"], warm, grad_fn)
    before = np.asarray(space.group_norms(params))
    params, state = _run(tx, params, proj - 1, grad_fn, state, start=warm)
    assert len(_zero_set(space, params)) < k  # not yet: the last projection step forces it
    # The scheduled fade-out: 1/3 of their norm is left here.
    fading = sorted(_redundant(state))
    np.testing.assert_allclose(np.asarray(space.group_norms(params))[fading],
                               before[fading] / proj, rtol=0.2)
    params, state = _run(tx, params, 1, grad_fn, state, start=warm + proj - 1)
    zeros = _zero_set(space, params)
    assert len(zeros) == k and zeros == _redundant(state) and space.is_valid(zeros)
    info = ag.h2spg_info(state)
    assert set(np.flatnonzero(np.asarray(info.zero_groups))) == zeros
    # All zeroed by the last projection step, the safeguard, at about 1/3 of their norm.
    assert set(np.flatnonzero(np.asarray(info.zero_step) == warm + proj - 1)) == zeros
    assert not np.any(np.asarray(info.zeroed_by_test))
    np.testing.assert_allclose(np.asarray(info.zero_relative_norm)[fading], 1 / proj, rtol=0.2)
    assert int(info.step) == warm + proj and np.all(np.isfinite(np.asarray(info.saliency)))
    params, state = _run(tx, params, 3, grad_fn, state, start=warm + proj)
    assert _zero_set(space, params) == zeros  # zero groups stay zero
    norms = np.asarray(space.group_norms(params))
    assert np.all(norms[sorted(set(range(space.num_groups)) - zeros)] > 0)
    _check_subnetwork_exact(space, {**variables, "params": params}, x)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_complement_follows_the_base_optimizer_bit_for_bit(demo, base):
    _, space, variables, _ = demo
    make = {"sgd": lambda: optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.05, 0.9)),
            "adamw": lambda: optax.adamw(1e-2, weight_decay=1e-3)}[base]
    tx = ag.h2spg(space, 0.05, 0.6, warmup_steps=2, projection_steps=2, base=make())
    ref = make()
    params = ref_params = variables["params"]
    state, ref_state = tx.init(params), ref.init(params)
    gids = space.leaf_groups(params)

    update, ref_update = jax.jit(tx.update), jax.jit(ref.update)
    for t in range(6):
        g = _synthetic_grads(params, t)
        u, state = update(g, state, params)
        ru, ref_state = ref_update(g, ref_state, ref_params)
        params, ref_params = optax.apply_updates(params, u), optax.apply_updates(ref_params, ru)
        important = set(range(space.num_groups)) - _redundant(state)
        for gid, a, b in zip(gids, jax.tree_util.tree_leaves(u), jax.tree_util.tree_leaves(ru)):
            if gid < 0 or gid in important:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(_zero_set(space, params)) == 3


def test_figure3_search_marks_conv2_not_conv7(demo):
    _, space, variables, _ = demo
    # Ascending: Conv8, Conv3, Conv7, Conv2, Conv4-5: Conv7 ranks below Conv2.
    forced = jnp.array([3.0, 1.0, 4.0, 2.0, 0.0])
    graph = SearchGraph.from_space(space)
    assert set(np.flatnonzero(np.asarray(hierarchical_search(graph, forced, 3)))) == {
        CONV2, CONV3, CONV8}
    tx = ag.h2spg(space, 0.05, 0.6, warmup_steps=1, projection_steps=1,
                  saliency=lambda s: forced)
    params, state = _run(tx, variables["params"], 2)
    assert _redundant(state) == {CONV2, CONV3, CONV8} == _zero_set(space, params)
    # Without the hierarchy, the three lowest (Conv8, Conv3, Conv7) cut the network.
    dh = ag.dhspg(space, 0.05, 0.6, warmup_steps=1, projection_steps=1,
                  saliency=lambda s: forced)
    params, state = _run(dh, variables["params"], 2)
    assert _zero_set(space, params) == {CONV3, CONV7, CONV8}
    assert not space.is_valid(_zero_set(space, params))


def test_dhspg_baseline_is_invalid_at_high_sparsity_where_h2spg_stays_valid(demo):
    _, space, variables, _ = demo
    # K = 4 of 5: any four of DemoNet's structures leave Concat or Add without inputs.
    dh = ag.dhspg(space, 0.05, 0.8, warmup_steps=2, projection_steps=2)
    params, _ = _run(dh, variables["params"], 4)
    zeros = _zero_set(space, params)
    assert len(zeros) == 4 and not space.is_valid(zeros)
    with pytest.warns(ag.SparsityWarning, match="at most 3"):
        tx = ag.h2spg(space, 0.05, 0.8, warmup_steps=2, projection_steps=2)
    params, _ = _run(tx, variables["params"], 4)
    zeros = _zero_set(space, params)
    assert len(zeros) == 3 and space.is_valid(zeros)


def test_proxsg_plus_uses_the_hierarchical_search(demo):
    _, space, variables, _ = demo
    tx = ag.proxsg_plus(space, 0.05, 0.6, warmup_steps=2, projection_steps=3, group_lasso=1.0)
    h2 = ag.h2spg(space, 0.05, 0.6, warmup_steps=2, projection_steps=3)
    params, state = _run(tx, variables["params"], 5)
    _, h2_state = _run(h2, variables["params"], 5)
    zeros = _zero_set(space, params)
    assert zeros == _redundant(state) == _redundant(h2_state)
    assert len(zeros) == 3 and space.is_valid(zeros)


# --------------------------------------------------------------------------------------------
# optax composition.


def test_chains_with_clipping_and_reads_through_the_chain(demo):
    _, space, variables, _ = demo
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     ag.h2spg(space, 0.05, 0.6, warmup_steps=2, projection_steps=2))
    params, state = _run(tx, variables["params"], 4)
    zeros = _zero_set(space, params)
    assert len(zeros) == 3 and zeros == _redundant(state) and space.is_valid(zeros)


def test_inject_hyperparams_with_schedules_matches_the_plain_transformation(demo):
    _, space, variables, _ = demo
    schedule = optax.linear_schedule(0.05, 0.01, 6)
    injected = optax.inject_hyperparams(ag.h2spg)(
        space, learning_rate=schedule, target_group_sparsity=0.6, warmup_steps=2,
        projection_steps=2, group_lasso=0.5)
    plain = ag.h2spg(space, schedule, 0.6, warmup_steps=2, projection_steps=2, group_lasso=0.5)
    p1, s1 = _run(injected, variables["params"], 6)
    p2, s2 = _run(plain, variables["params"], 6)
    assert _zero_set(space, p1) == _zero_set(space, p2) == _redundant(s1) == _redundant(s2)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           p1, p2)
    assert float(s1.hyperparams["learning_rate"]) == pytest.approx(float(schedule(5)))


def test_only_the_search_step_calls_the_host_once(demo, monkeypatch):
    from asgssd_jax.optim import search as search_module

    _, space, variables, _ = demo
    tx = ag.h2spg(space, 0.05, 0.6, warmup_steps=2, projection_steps=2)
    params = variables["params"]
    text = str(jax.make_jaxpr(tx.update)(params, tx.init(params), params))
    assert text.count("pure_callback") == 1 and "io_callback" not in text
    calls = []
    real = search_module.host_hierarchical_search
    monkeypatch.setattr(search_module, "host_hierarchical_search",
                        lambda *a: calls.append(a[2]) or real(*a))
    p1, state = _run(tx, params, 6)
    assert len(calls) == 1  # at update warmup_steps only
    want = hierarchical_search(SearchGraph.from_space(space), ag.h2spg_info(state).saliency,
                               int(0.6 * space.num_groups))
    assert _redundant(state) == set(np.flatnonzero(np.asarray(want)))
    # host_search=False: no host call, the same run bit for bit, and the step exports.
    from jax import export

    in_graph = ag.h2spg(space, 0.05, 0.6, warmup_steps=2, projection_steps=2, host_search=False)
    assert "callback" not in str(jax.make_jaxpr(in_graph.update)(params, in_graph.init(params),
                                                                  params))
    p2, state2 = _run(in_graph, params, 6)
    assert len(calls) == 1
    for a, b in zip(jax.tree_util.tree_leaves((p1, state)),
                    jax.tree_util.tree_leaves((p2, state2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    export.export(jax.jit(in_graph.update))(params, in_graph.init(params), params)


def test_orbax_checkpoint_in_each_phase_resumes_bit_identically(demo, tmp_path):
    import orbax.checkpoint as ocp

    _, space, variables, _ = demo
    tx = ag.h2spg(space, 0.05, 0.6, warmup_steps=3, projection_steps=3)
    total = 9
    want_params, want_state = _run(tx, variables["params"], total)
    ckpt = ocp.StandardCheckpointer()
    for stop in (1, 4, 7):  # warm-up, projection, after
        params, state = _run(tx, variables["params"], stop)
        path = tmp_path / f"step{stop}"
        ckpt.save(path, {"params": params, "opt_state": state})
        ckpt.wait_until_finished()
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                          {"params": params, "opt_state": state})
        restored = ckpt.restore(path, abstract)
        assert isinstance(restored["opt_state"], ag.H2SPGState)
        params, state = _run(tx, restored["params"], total - stop, state=restored["opt_state"],
                             start=stop)
        for a, b in zip(jax.tree_util.tree_leaves((params, state)),
                        jax.tree_util.tree_leaves((want_params, want_state))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("kwargs, match", [
    (dict(target_group_sparsity=1.0), "target_group_sparsity"),
    (dict(target_group_sparsity=-0.1), "target_group_sparsity"),
    (dict(warmup_steps=0), "warmup_steps"),
    (dict(projection_steps=0), "projection_steps"),
    (dict(warmup_steps=2.5), "warmup_steps"),
    (dict(base="lion"), "base must be"),
    (dict(saliency="nope"), "unknown saliency"),
    (dict(host_search="yes"), "host_search must be True or False"),
])
def test_bad_arguments_raise(demo, kwargs, match):
    _, space, _, _ = demo
    args = dict(learning_rate=0.1, target_group_sparsity=0.5, warmup_steps=2, projection_steps=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ag.h2spg(space, **args)


def test_params_tree_that_does_not_match_the_space_raises(demo):
    _, space, variables, _ = demo
    tx = ag.h2spg(space, 0.1, 0.5, warmup_steps=2, projection_steps=2)
    params = variables["params"]
    other = models.create("demonet", width=2).init(KEY, jnp.ones((1, 28, 28, 1)))["params"]
    with pytest.raises(ValueError, match="does not match the search space"):
        tx.init(other)  # same paths, other shapes
    missing = {k: v for k, v in params.items() if k != "conv7"}
    with pytest.raises(ValueError, match="does not match the search space"):
        tx.init(missing)
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(params, state)
    with pytest.raises(ValueError, match="different structures"):
        tx.update(missing, state, params)
    with pytest.raises(ValueError, match="shape"):
        ag.h2spg(space, 0.1, 0.5, warmup_steps=1, projection_steps=1,
                 saliency=lambda s: jnp.zeros(3)).update(params, state, params)


def _nan_grads(p, t):
    g = _synthetic_grads(p, t)
    return jax.tree_util.tree_map(lambda a: jnp.where(t == 1, jnp.nan, a), g)


def test_apply_if_finite_skips_the_bad_step_and_the_run_continues_exactly(demo):
    _, space, variables, _ = demo
    tx = optax.apply_if_finite(ag.h2spg(space, 0.05, 0.6, warmup_steps=3, projection_steps=2), 3)
    # Step 1 is NaN and skipped: the run equals one on the gradients of steps 0, 2, 3, ...
    params, state = _run(tx, variables["params"], 7, _nan_grads)
    assert int(state.total_notfinite) == 1 and int(ag.h2spg_info(state).step) == 6
    plain = ag.h2spg(space, 0.05, 0.6, warmup_steps=3, projection_steps=2)
    skip = lambda p, t: _synthetic_grads(p, jnp.where(t >= 1, t + 1, t))  # noqa: E731
    want, want_state = _run(plain, variables["params"], 6, skip)
    # Another program (the step sits in a lax.cond), so equal up to float rounding.
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    zeros = _zero_set(space, params)
    assert zeros == _zero_set(space, want) == _redundant(want_state)
    assert len(zeros) == 3 and space.is_valid(zeros)


# --------------------------------------------------------------------------------------------
# Saliency proxies.


def test_saliency_proxies_rank_groups_as_documented(demo):
    _, space, variables, _ = demo
    g = np.arange(1.0, 6.0, dtype=np.float32)
    inputs = ag.optim.SaliencyInputs(
        param_sq=jnp.asarray(g ** 2), grad_sq=jnp.ones(5), param_dot_grad=jnp.asarray(-g),
        num_params=jnp.ones(5), macs=jnp.asarray([1.0, 1.0, 1.0, 1.0, 100.0]),
        params=None, grads=None, leaf_groups=())
    assert np.argmin(ag.magnitude_saliency(inputs)) == 0
    assert np.argmin(ag.taylor_saliency(inputs)) == 0
    # The default marks small, gradient-aligned groups as redundant.
    aligned = inputs._replace(param_dot_grad=jnp.asarray([1.0, -1, -1, -1, -1]) * g)
    assert np.argmin(ag.dhspg_saliency(aligned)) == 0
    flat = inputs._replace(param_sq=jnp.ones(5), param_dot_grad=jnp.zeros(5))
    assert np.argmin(ag.cost_aware_saliency(ag.magnitude_saliency)(flat)) == 4


def test_cost_aware_saliency_removes_the_expensive_branch(demo):
    _, space, variables, _ = demo
    tx = ag.h2spg(space, 0.05, 0.2, warmup_steps=2, projection_steps=1,
                  saliency=ag.cost_aware_saliency(lambda s: jnp.zeros(5), cost_weight=1.0))
    _, state = _run(tx, variables["params"], 3)
    (chosen,) = _redundant(state)
    assert space.groups[chosen].macs == max(g.macs for g in space.groups)


# --------------------------------------------------------------------------------------------
# The in-graph search against Algorithm 3 on the host.


def _host_greedy(graph: nx.DiGraph, source, output, nodes, saliency, k) -> list[int]:
    chosen: list[int] = []
    for g in np.argsort(saliency, kind="stable"):
        if len(chosen) >= k:
            break
        h = graph.copy()
        h.remove_nodes_from([nodes[j] for j in [*chosen, g]])
        if nx.has_path(h, source, output):
            chosen.append(int(g))
    return sorted(chosen)


@st.composite
def _dags(draw):
    n = draw(st.integers(4, 12))
    g = nx.DiGraph()
    g.add_nodes_from(range(n))
    for b in range(1, n):
        preds = draw(st.lists(st.integers(0, b - 1), min_size=1, max_size=3, unique=True))
        g.add_edges_from((a, b) for a in preds)
    for v in range(n - 1):
        if g.out_degree(v) == 0:
            g.add_edge(v, n - 1)
    groups = draw(st.lists(st.integers(1, n - 2), unique=True, max_size=n - 2)) if n > 2 else []
    saliency = draw(st.lists(st.floats(-1, 1, width=32), min_size=len(groups),
                             max_size=len(groups)))
    return g, groups, np.asarray(saliency, np.float32)


@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_dags(), st.floats(0, 0.99))
def test_search_is_algorithm3_and_always_reaches_k_when_possible(dag, sparsity):
    g, groups, saliency = dag
    graph = SearchGraph.from_graph(g, [0], len(g) - 1, groups)

    def valid(chosen):
        h = g.copy()
        h.remove_nodes_from([groups[j] for j in chosen])
        return nx.has_path(h, 0, len(g) - 1)

    most = max(len(c) for r in range(len(groups) + 1)
               for c in itertools.combinations(range(len(groups)), r) if valid(c))
    assert graph.max_removable == most
    k = int(sparsity * len(groups))
    got = sorted(np.flatnonzero(np.asarray(hierarchical_search(graph, saliency, k))).tolist())
    assert len(got) == min(k, most) and valid(got)
    host = _host_greedy(g, 0, len(g) - 1, groups, saliency, min(k, most))
    if len(host) == min(k, most):  # Algorithm 3 itself reached K: same choice
        assert got == host
    order = np.asarray(search_order(jnp.asarray(saliency)))
    assert sorted(np.flatnonzero(host_hierarchical_search(graph, order, k)).tolist()) == got
    top = np.flatnonzero(np.asarray(top_k_search(len(groups), saliency, k)))
    assert len(top) == k


# --------------------------------------------------------------------------------------------
# Random architectures.


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(random_network(), st.floats(0.0, 0.95))
def test_random_networks_end_with_k_valid_zero_groups_and_an_exact_subnetwork(net, sparsity):
    module, shape = net
    variables = init_random(module, shape)
    x = jax.random.normal(jax.random.key(3), (2, *shape))
    space = ag.generate_search_space(module.apply, variables, x, train=False)
    k = min(int(sparsity * space.num_groups), SearchGraph.from_space(space).max_removable)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ag.SparsityWarning)
        tx = ag.h2spg(space, 0.05, sparsity, warmup_steps=1, projection_steps=2)
    params, state = _run(tx, variables["params"], 4)
    zeros = _zero_set(space, params)
    assert len(zeros) == k and zeros == _redundant(state) and space.is_valid(zeros)
    _check_subnetwork_exact(space, {**variables, "params": params}, x)
