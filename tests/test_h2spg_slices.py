"""H2SPG and its baselines on groups that are slices of leaves: one layer of a stacked
parameter per group (static indices into the stack, and ``lax.scan`` over it)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import asgssd_jax as ag

D, L = 6, 4
WARM, PROJ = 3, 3
SPARSITY = 0.5  # K = 2 of the 4 layers


def _stack(seed: int = 0) -> dict:
    k = jax.random.split(jax.random.key(seed), 3)
    return {"w": jax.random.normal(k[0], (L, D, D)) / 3,
            "b": jax.random.normal(k[1], (L, D)) / 5,
            "out": jax.random.normal(k[2], (D, 3))}


def indexed_fn(p, x):
    for j in range(L):
        x = x + jnp.tanh(x @ p["w"][j] + p["b"][j])
    return x @ p["out"]


def scan_fn(p, x):
    def body(h, wb):
        w, b = wb
        return h + jnp.tanh(h @ w + b), None

    return jax.lax.scan(body, x, (p["w"], p["b"]))[0] @ p["out"]


def unrolled_fn(p, x):
    """``indexed_fn`` with each layer's parameters in leaves of their own."""
    for j in range(L):
        x = x + jnp.tanh(x @ p[f"w{j}"] + p[f"b{j}"])
    return x @ p["out"]


def _unstack(p: dict) -> dict:
    return {**{f"w{j}": p["w"][j] for j in range(L)}, **{f"b{j}": p["b"][j] for j in range(L)},
            "out": p["out"]}


X = jax.random.normal(jax.random.key(1), (8, D))
Y = jnp.arange(8) % 3


@functools.cache
def _space(fn):
    return ag.generate_search_space(fn, _stack() if fn is not unrolled_fn
                                    else _unstack(_stack()), X[:2])


@functools.cache
def _grad(fn):
    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(fn(p, X), Y).mean()
    return jax.jit(jax.grad(loss))


def _run(tx, fn, params, steps):
    """Yields (updates, params, state) after each of ``steps`` jitted updates."""
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(steps):
        updates, state = update(_grad(fn)(params), state, params)
        params = optax.apply_updates(params, updates)
        yield updates, params, state


@pytest.mark.parametrize("fn", [indexed_fn, scan_fn], ids=["indexed", "lax.scan"])
def test_h2spg_zeroes_exactly_k_valid_layer_slices(fn):
    space = _space(fn)
    assert space.num_groups == L
    assert all(s.axis == 0 for gr in space.groups for s in gr.slices)
    tx = ag.h2spg(space, 0.1, SPARSITY, warmup_steps=WARM, projection_steps=PROJ)
    k = int(SPARSITY * L)
    for _, params, state in _run(tx, fn, _stack(), WARM + PROJ + 2):
        info = ag.h2spg_info(state)
        # the state's zero flags are exactly the zero slices of the parameters, at every step
        assert np.flatnonzero(np.asarray(info.zero_groups)).tolist() == \
            space.zero_group_indices(params)
    zeros = space.zero_group_indices(params)
    assert len(zeros) == k and space.is_valid(zeros)
    assert zeros == np.flatnonzero(np.asarray(info.redundant)).tolist()
    kept = sorted(set(range(L)) - set(zeros))
    assert np.all(np.asarray(space.group_norms(params))[kept] > 0)
    for j in zeros:  # the whole layer, weight and bias slices, is exactly zero
        assert not np.any(np.asarray(params["w"][j])) and not np.any(np.asarray(params["b"][j]))


def test_a_stacked_leaf_trains_as_the_same_layers_in_leaves_of_their_own():
    stacked, unrolled = _space(indexed_fn), _space(unrolled_fn)
    assert [g.num_params for g in stacked.groups] == [g.num_params for g in unrolled.groups]
    make = lambda space: ag.h2spg(space, 0.1, SPARSITY, warmup_steps=WARM,  # noqa: E731
                                  projection_steps=PROJ)
    runs = zip(_run(make(stacked), indexed_fn, _stack(), WARM + PROJ + 1),
               _run(make(unrolled), unrolled_fn, _unstack(_stack()), WARM + PROJ + 1))
    for (us, ps, ss), (uu, pu, su) in runs:
        for a, b in zip(jax.tree_util.tree_leaves(_unstack(us)), jax.tree_util.tree_leaves(uu)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
        a, b = ag.h2spg_info(ss), ag.h2spg_info(su)
        np.testing.assert_allclose(np.asarray(a.saliency), np.asarray(b.saliency), rtol=1e-5)
        assert np.array_equal(np.asarray(a.redundant), np.asarray(b.redundant))
        assert np.array_equal(np.asarray(a.zero_groups), np.asarray(b.zero_groups))
    assert len(stacked.zero_group_indices(ps)) == int(SPARSITY * L)


def test_complement_slices_follow_the_base_optimizer_bit_for_bit():
    space = _space(indexed_fn)
    tx = ag.h2spg(space, 0.1, SPARSITY, warmup_steps=WARM, projection_steps=PROJ)
    ref = optax.sgd(0.1, momentum=0.9)
    params = ref_params = _stack()
    state, ref_state = tx.init(params), ref.init(params)
    grads = lambda p, t: jax.tree_util.tree_map(  # noqa: E731  elementwise in p
        lambda a: 0.1 * a + 0.05 * jnp.sin(37.0 * a + t), p)
    update, ref_update = jax.jit(tx.update), jax.jit(ref.update)
    for t in range(WARM + PROJ + 1):
        u, state = update(grads(params, t), state, params)
        ru, ref_state = ref_update(grads(ref_params, t), ref_state, ref_params)
        redundant = np.asarray(ag.h2spg_info(state).redundant)
        kept = np.flatnonzero(~redundant)
        for name in ("w", "b"):  # G_r^C's slices of the split leaves
            np.testing.assert_array_equal(np.asarray(u[name])[kept], np.asarray(ru[name])[kept])
        np.testing.assert_array_equal(np.asarray(u["out"]), np.asarray(ru["out"]))  # G_s^C
        zero = np.flatnonzero(np.asarray(ag.h2spg_info(state).zero_groups))
        for name in ("w", "b"):  # a zero group's update is exactly -params
            np.testing.assert_array_equal(np.asarray(u[name])[zero],
                                          -np.asarray(params[name])[zero])
        params, ref_params = optax.apply_updates(params, u), optax.apply_updates(ref_params, ru)
    assert len(space.zero_group_indices(params)) == int(SPARSITY * L)


@pytest.mark.parametrize("make", [ag.optim.dhspg, ag.optim.proxsg_plus], ids=["dhspg", "proxsg+"])
def test_baselines_zero_k_layer_slices(make):
    space = _space(scan_fn)
    tx = make(space, 0.1, SPARSITY, warmup_steps=WARM, projection_steps=PROJ)
    *_, (_, params, state) = _run(tx, scan_fn, _stack(), WARM + PROJ)
    zeros = space.zero_group_indices(params)
    assert len(zeros) == int(SPARSITY * L)
    assert zeros == np.flatnonzero(np.asarray(ag.h2spg_info(state).zero_groups)).tolist()


def test_a_custom_saliency_reads_the_slices_through_leaf_maps():
    space = _space(indexed_fn)
    p = _stack()
    p["b"] = p["b"] * jnp.array([3.0, 0.1, 2.0, 0.2])[:, None]  # layers 1 and 3: small biases

    def bias_norm(inputs):
        num = len(inputs.param_sq)
        paths = [jax.tree_util.keystr(k) for k, _ in
                 jax.tree_util.tree_flatten_with_path(inputs.params)[0]]
        leaves = jax.tree_util.tree_leaves(inputs.params)
        sq = sum(m.group_sums(jnp.square(x), num)
                 for x, m, path in zip(leaves, inputs.leaf_maps, paths) if "'b'" in path)
        return jnp.sqrt(sq)

    tx = ag.h2spg(space, 1e-3, SPARSITY, warmup_steps=WARM, projection_steps=PROJ,
                  saliency=bias_norm)
    *_, (_, params, state) = _run(tx, indexed_fn, p, WARM + PROJ)
    assert np.flatnonzero(np.asarray(ag.h2spg_info(state).redundant)).tolist() == [1, 3]
    assert space.zero_group_indices(params) == [1, 3]


def test_a_stack_of_another_depth_does_not_match_the_space():
    tx = ag.h2spg(_space(indexed_fn), 0.1, SPARSITY, warmup_steps=WARM, projection_steps=PROJ)
    p = _stack()
    short = {**p, "w": p["w"][:-1], "b": p["b"][:-1]}
    with pytest.raises(ValueError, match="does not match the search space"):
        tx.init(short)


def test_h2spg_on_a_scanned_decoder_zeroes_k_blocks_and_builds_an_exact_sub_network():
    """``nn.scan`` over the layers of the zoo's decoder: each layer's attention and MLP block is
    a group of slices of the stacked leaves under ``params/layers``."""
    import asgssd_zoo as zoo

    model = zoo.create("decoder_lm", scan_layers=True, depth=2, dim=16, num_heads=2,
                       num_kv_heads=1, mlp_dim=32)
    tokens = jax.random.randint(jax.random.key(3), (4, 8), 0, 90)
    variables = model.init(jax.random.key(0), tokens[:2], train=False)
    space = ag.generate_search_space(model.apply, variables, tokens[:2], train=False)
    assert space.num_groups == 4 and all(s.axis == 0 for gr in space.groups for s in gr.slices)

    def loss(p):
        logits = model.apply({**variables, "params": p}, tokens[:, :-1], train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    tx = ag.h2spg(space, 0.05, 0.5, warmup_steps=2, projection_steps=2)
    params, state = variables["params"], tx.init(variables["params"])
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
    for _ in range(5):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
        zero = np.flatnonzero(np.asarray(ag.h2spg_info(state).zero_groups)).tolist()
        assert zero == space.zero_group_indices(params)
    assert len(zero) == 2 and space.is_valid(zero)
    trained = {**variables, "params": params}
    sub = ag.construct_subnetwork(space, trained)
    want = model.apply(trained, tokens, train=False)
    got = sub.apply(sub.variables, tokens, train=False)
    assert ag.relative_difference(want, got) <= 1e-5
