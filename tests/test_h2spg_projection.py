"""H2SPG's hybrid phase: the half-space test zeroes the redundant groups (the paper's
mechanism), the scheduled fade-out option, and steps with non-finite gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import asgssd_jax as ag
import asgssd_zoo as models

KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def demo():
    net = models.create("demonet")
    x = jax.random.normal(jax.random.key(1), (8, *models.input_shape("demonet")))
    variables = net.init(KEY, x[:2])
    space = ag.generate_search_space(net.apply, variables, x[:2], train=False)
    y = jnp.arange(len(x)) % 10

    def loss(p):
        out = net.apply({**variables, "params": p}, x, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

    return space, variables["params"], jax.jit(jax.value_and_grad(loss))


def _steps(tx, params, grads_at, steps, state=None, start=0):
    """Runs ``steps`` updates with ``grads_at(params, t)``; yields (t, params, state) after
    each."""
    state = tx.init(params) if state is None else state
    update = _jitted_update(tx)
    for t in range(start, start + steps):
        updates, state = update(grads_at(params, t), state, params)
        params = optax.apply_updates(params, updates)
        yield t, params, state


@functools.cache
def _jitted_update(tx):
    return jax.jit(tx.update)


def _last(it):
    *_, out = it
    return out


def _zero_set(space, params) -> set[int]:
    return set(space.zero_group_indices(params))


def test_half_space_test_zeroes_the_redundant_groups_before_the_last_projection_step(demo):
    space, params, value_and_grad = demo
    warm, proj = 4, 8
    tx = ag.h2spg(space, 0.05, 0.6, warmup_steps=warm, projection_steps=proj)
    k = int(0.6 * space.num_groups)
    grads = lambda p, t: value_and_grad(p)[1]  # noqa: E731
    losses = []
    for t, params, state in _steps(tx, params, grads, warm + proj + 2):
        losses.append(float(value_and_grad(params)[0]))
        info = ag.h2spg_info(state)
        # the flags say exactly which groups are zero, at every step
        assert set(np.flatnonzero(np.asarray(info.zero_groups))) == _zero_set(space, params)
        if t == warm + proj - 2:  # before the last projection step
            assert len(_zero_set(space, params)) == k
    info = ag.h2spg_info(state)
    zeros = _zero_set(space, params)
    redundant = set(np.flatnonzero(np.asarray(info.redundant)).tolist())
    assert zeros == redundant and len(zeros) == k and space.is_valid(zeros)
    z = sorted(zeros)
    zero_step = np.asarray(info.zero_step)
    assert np.all(np.asarray(info.zeroed_by_test)[z])
    assert np.all((zero_step[z] > warm) & (zero_step[z] < warm + proj - 1))
    assert np.all(zero_step[sorted(set(range(space.num_groups)) - zeros)] == -1)
    # zeroed progressively, at a small fraction of the norm they had at the search
    rel = np.asarray(info.zero_relative_norm)[z]
    assert np.all((rel > 0) & (rel < 0.5))
    # so the loss does not jump at the last projection step
    assert losses[warm + proj - 1] <= losses[warm + proj - 2] + 1e-3


def test_fixed_group_lasso_too_weak_for_the_test_leaves_the_zeroing_to_the_safeguard(demo):
    space, params, value_and_grad = demo
    warm, proj = 2, 3
    tx = ag.h2spg(space, 0.05, 0.6, warmup_steps=warm, projection_steps=proj, group_lasso=1e-3)
    _, params, state = _last(_steps(tx, params, lambda p, t: value_and_grad(p)[1], warm + proj))
    info = ag.h2spg_info(state)
    z = np.flatnonzero(np.asarray(info.zero_groups))
    assert len(z) == int(0.6 * space.num_groups)
    assert np.all(np.asarray(info.zero_step)[z] == warm + proj - 1)
    assert not np.any(np.asarray(info.zeroed_by_test))
    assert np.all(np.asarray(info.zero_relative_norm)[z] > 0.5)  # large: the safeguard's jump


def test_fade_out_takes_one_rth_of_the_norm_each_step(demo):
    """The scheduled fade-out (``fade_out=True``): with a zero base step, each redundant group
    keeps exactly 1 - 1/r of itself at the r-th last projection step."""
    space, params, value_and_grad = demo
    warm, proj = 2, 5
    tx = ag.h2spg(space, 0.05, 0.6, warmup_steps=warm, projection_steps=proj,
                  base=optax.sgd(0.05), fade_out=True)
    grads = lambda p, t: jax.tree_util.tree_map(  # noqa: E731
        jnp.zeros_like, p) if t >= warm else value_and_grad(p)[1]
    norms, redundant = [], None
    for t, params, state in _steps(tx, params, grads, warm + proj):
        norms.append(np.asarray(space.group_norms(params)))
        redundant = np.asarray(ag.h2spg_info(state).redundant)
    r = sorted(np.flatnonzero(redundant))
    for t in range(warm, warm + proj - 1):
        left = warm + proj - t
        np.testing.assert_allclose(norms[t][r], norms[t - 1][r] * (1 - 1 / left), rtol=1e-5)
    assert np.all(norms[-1][r] == 0)
    info = ag.h2spg_info(state)
    assert np.all(np.asarray(info.zero_step)[r] == warm + proj - 1)
    assert not np.any(np.asarray(info.zeroed_by_test))


# --------------------------------------------------------------------------------------------
# Non-finite gradients: the step is skipped, state and parameters stay as they were.

WARM, PROJ, TOTAL = 3, 3, 9


def _grads(p, t):
    return jax.tree_util.tree_map(lambda a: 0.1 * a + 0.05 * jnp.sin(37.0 * a + t), p)


@pytest.fixture(scope="module")
def nan_tx(demo):
    return ag.h2spg(demo[0], 0.05, 0.6, warmup_steps=WARM, projection_steps=PROJ)


@pytest.mark.parametrize("bad, phase, where", [
    (1, "warm-up", "all"), (WARM, "search", "all"), (WARM + 1, "projection", "all"),
    (WARM + 1, "projection", "one leaf"), (WARM + PROJ - 1, "last projection step", "all"),
    (WARM + PROJ + 1, "after", "all")])
def test_a_non_finite_step_is_skipped_in_every_phase(demo, nan_tx, bad, phase, where):
    space, params0, _ = demo
    tx = nan_tx

    def nan_grads(p, t):
        g = _grads(p, t)
        leaves, treedef = jax.tree_util.tree_flatten(g)
        poison = range(len(leaves)) if where == "all" else [len(leaves) // 2]
        for i in poison:
            leaves[i] = leaves[i].at[(0,) * leaves[i].ndim].set(
                jnp.nan if where == "all" else jnp.inf)
        return jax.tree_util.tree_unflatten(treedef, leaves) if t == bad else g

    before = None
    for t, params, state in _steps(tx, params0, nan_grads, TOTAL + 1):
        info = ag.h2spg_info(state)
        assert set(np.flatnonzero(np.asarray(info.zero_groups))) == _zero_set(space, params)
        if t == bad - 1:
            before = (params, state)
        if t == bad:  # nothing moved but the counter
            for a, b in zip(jax.tree_util.tree_leaves(before[0]),
                            jax.tree_util.tree_leaves(params)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            old = before[1] if bad > 0 else tx.init(params0)
            assert int(state.notfinite_count) == int(old.notfinite_count) + 1
            for a, b in zip(jax.tree_util.tree_leaves(old._replace(notfinite_count=0)),
                            jax.tree_util.tree_leaves(state._replace(notfinite_count=0))):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(ag.h2spg_info(state).skipped_steps) == 1 and int(state.count) == TOTAL
    # The run equals one that never saw the bad step.
    skip = lambda p, t: _grads(p, t + 1 if t >= bad else t)  # noqa: E731
    _, want, want_state = _last(_steps(tx, params0, skip, TOTAL))
    for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    zeros = _zero_set(space, params)
    assert len(zeros) == int(0.6 * space.num_groups) and space.is_valid(zeros)


@pytest.mark.parametrize("bad", [1, WARM, WARM + 1, WARM + PROJ + 1])
def test_a_finite_gradient_whose_base_update_is_not_finite_is_skipped(demo, bad):
    # The base optimizer overflows on a large (finite) gradient: the update is what is checked.
    space, params0, _ = demo
    overflow = optax.stateless(lambda u, p: jax.tree_util.tree_map(
        lambda a: jnp.where(jnp.abs(a) > 1e3, jnp.inf, a), u))
    tx = ag.h2spg(space, 0.05, 0.6, warmup_steps=WARM, projection_steps=PROJ,
                  base=optax.chain(optax.sgd(0.05, momentum=0.9), overflow))

    def big_at_bad(p, t):
        g = _grads(p, t)
        return jax.tree_util.tree_map(lambda a: a.at[(0,) * a.ndim].set(1e6), g) if t == bad else g

    runs = list(_steps(tx, params0, big_at_bad, TOTAL + 1))
    (_, p_before, s_before), (_, p_bad, s_bad) = runs[bad - 1], runs[bad]
    for a, b in zip(jax.tree_util.tree_leaves((p_before, s_before._replace(notfinite_count=0))),
                    jax.tree_util.tree_leaves((p_bad, s_bad._replace(notfinite_count=0)))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(s_bad.notfinite_count) == 1
    skip = lambda p, t: _grads(p, t + 1 if t >= bad else t)  # noqa: E731
    _, want, _ = _last(_steps(tx, params0, skip, TOTAL))
    for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(runs[-1][1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nonfinite_raise_raises_and_the_default_has_no_debug_callback(demo):
    space, params, _ = demo
    tx = ag.h2spg(space, 0.05, 0.6, warmup_steps=2, projection_steps=2, nonfinite="raise")
    state = tx.init(params)
    update = jax.jit(tx.update)
    jax.block_until_ready(update(_grads(params, 0), state, params))  # finite: fine
    bad = jax.tree_util.tree_map(lambda a: jnp.full_like(a, jnp.nan), params)
    with pytest.raises(Exception, match="non-finite gradient"):
        jax.block_until_ready(update(bad, state, params))
    plain = ag.h2spg(space, 0.05, 0.6, warmup_steps=2, projection_steps=2)
    text = str(jax.make_jaxpr(plain.update)(params, plain.init(params), params))
    assert "debug_callback" not in text and text.count("pure_callback") == 1  # the search's
    with pytest.raises(ValueError, match="nonfinite"):
        ag.h2spg(space, 0.05, 0.6, warmup_steps=2, projection_steps=2, nonfinite="ignore")


def test_an_empty_search_space_warns_that_nothing_will_be_removed():
    import warnings

    def scanned(v, x):  # a layer stack under lax.scan is opaque: no removal structure
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, v["w"])[0]

    space = ag.generate_search_space(scanned, {"w": jnp.ones((3, 4, 4))}, jnp.ones((2, 4)))
    assert space.num_groups == 0
    with pytest.warns(ag.SparsityWarning, match="no removal structures"):
        ag.h2spg(space, 0.1, 0.5, warmup_steps=1, projection_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ag.h2spg(space, 0.1, 0.0, warmup_steps=1, projection_steps=1)  # nothing asked for
