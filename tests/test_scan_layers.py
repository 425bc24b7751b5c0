"""Scanned and stacked layers: one group per layer (slices of the stacked leaves), validity on
the unrolled segment graph, exact sub-networks that drop the removed layers' slices."""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import asgssd_jax as ag
import asgssd_zoo as zoo

RTOL = 1e-5
D, L = 8, 3


def _stack(seed: int = 0) -> dict:
    k = jax.random.split(jax.random.key(seed), 3)
    return {"w": jax.random.normal(k[0], (L, D, 2 * D)) / 3,
            "v": jax.random.normal(k[1], (L, 2 * D, D)) / 3,
            "out": jax.random.normal(k[2], (D, 2))}


def indexed_fn(p, x):
    for j in range(L):
        x = x + jnp.tanh(x @ p["w"][j]) @ p["v"][j]
    return x @ p["out"]


def scan_fn(p, x, reverse=False):
    def body(c, wv):
        w, v = wv
        h = c + jnp.tanh(c @ w) @ v
        return h, jnp.sum(h, -1)  # a per-layer output, stacked by the scan

    x, per_layer = jax.lax.scan(body, x, (p["w"], p["v"]), reverse=reverse)
    return x @ p["out"], per_layer


def _x(batch: int, seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, D))


@pytest.mark.parametrize("fn", [indexed_fn, scan_fn,
                                lambda p, x: scan_fn(p, x, reverse=True)],
                         ids=["indexed", "lax.scan", "lax.scan-reverse"])
def test_each_layer_is_a_group_of_slices_and_sub_networks_are_exact(fn):
    p = _stack()
    space = ag.generate_search_space(fn, p, _x(2))
    assert space.num_groups == L
    layers = []
    for gr in space.groups:  # in program order (a reverse scan runs the last layer first)
        j = gr.slices[0].indices[0]
        layers.append(j)
        assert {(s.path, s.axis, s.indices) for s in gr.slices} == {("w", 0, (j,)), ("v", 0, (j,))}
        assert gr.param_paths == (f"v[{j}]", f"w[{j}]")
        assert gr.num_params == 2 * D * 2 * D
    assert sorted(layers) == list(range(L))
    maps = space.leaf_group_maps(p)
    assert [m.axis for m in maps] == [None, 0, 0]  # out, v, w
    np.testing.assert_array_equal(maps[1].ids[layers], np.arange(L))
    g1 = layers.index(1)  # the group of layer 1
    z = space.zero_groups(p, [g1])
    np.testing.assert_array_equal(z["w"][1], 0)
    assert np.all(np.asarray(z["w"][0]) == np.asarray(p["w"][0]))
    assert space.zero_group_indices(z) == [g1]
    norms = np.asarray(space.group_norms(z))
    assert norms[g1] == 0 and np.allclose(
        norms[layers.index(0)],
        np.sqrt(np.sum(np.square(p["w"][0])) + np.sum(np.square(p["v"][0]))), rtol=1e-6)
    sub = ag.construct_subnetwork(space, z)
    assert sub.variables["w"].shape == (L - 1, D, 2 * D)
    assert sub.variables["v"].shape == (L - 1, 2 * D, D)
    for batch in (1, 5):
        x = _x(batch, seed=batch)
        assert ag.relative_difference(fn(z, x), sub.apply(sub.variables, x)) <= RTOL


def test_validity_is_judged_on_the_unrolled_layers():
    p = _stack()

    def chain(p, x):  # the middle layer is not residual: it cannot go
        def body(c, wv):
            w, v = wv
            return c + jnp.tanh(c @ w) @ v, None
        x = jax.lax.scan(body, x, (p["w"][:2], p["v"][:2]))[0]
        x = jnp.tanh(x @ p["w"][2]) @ p["v"][2]
        return x @ p["out"]

    space = ag.generate_search_space(scan_fn, p, _x(2))
    assert space.is_valid(range(L))  # every residual layer may go: the skips keep the path
    sub = ag.construct_subnetwork(space, space.zero_groups(p, range(L)))
    assert "w" not in sub.variables and "v" not in sub.variables
    # w[:2] is a static slice of two layers: the leaf is shared with w[2] (no removal structure)
    space = ag.generate_search_space(chain, p, _x(2))
    assert space.num_groups == 0


def test_a_scan_over_data_alone_stays_opaque():
    w = {"w": jnp.eye(D) * 0.5, "out": jnp.ones((D, 2))}

    def rnn(p, xs):  # shared weights over time steps: nothing per step to remove
        h = jax.lax.scan(lambda h, x: (jnp.tanh(h @ p["w"] + x), None),
                         jnp.zeros(xs.shape[1:]), xs)[0]
        return h @ p["out"]

    space = ag.generate_search_space(rnn, w, jnp.ones((4, 2, D)))
    assert space.num_groups == 0
    assert "scan" in space.trace.program.ops[-2].name or any(
        op.name == "scan" for op in space.trace.program.ops)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ag.h2spg(space, 0.1, 0.5, warmup_steps=1, projection_steps=1)
    assert any("no removal structures" in str(w.message) for w in caught)


class _Layer(nn.Module):
    train: bool

    @nn.compact
    def __call__(self, x, _):
        h = nn.Dense(2 * D)(nn.LayerNorm()(x))
        h = nn.Dropout(0.3, deterministic=not self.train)(nn.gelu(h))
        return x + nn.Dense(D)(h), None


class _ScanNet(nn.Module):
    """``L`` layers under ``nn.scan`` (every collection stacked on axis 0), then a head."""

    layer: type = _Layer

    @nn.compact
    def __call__(self, x, train: bool = False):
        stack = nn.scan(self.layer, variable_axes={"params": 0, "batch_stats": 0},
                        split_rngs={"params": True, "dropout": True}, length=L)
        x, _ = stack(train, name="layers")(x, None)
        return nn.Dense(2)(x)


def test_linen_nn_scan_per_layer_groups_exact_in_train_mode():
    model = _ScanNet()
    v = model.init(jax.random.key(0), _x(2))
    space = ag.generate_search_space(model.apply, v, _x(2), train=False)
    assert space.num_groups == L
    # each layer's group: its norm and both projections (slices of the stacked leaves)
    assert {s.path.split("/", 2)[2] for s in space.groups[0].slices} == {
        "Dense_0/bias", "Dense_0/kernel", "Dense_1/bias", "Dense_1/kernel",
        "LayerNorm_0/bias", "LayerNorm_0/scale"}
    z = space.zero_groups(v, [0, 2])
    sub = ag.construct_subnetwork(space, z)
    assert sub.variables["params"]["layers"]["Dense_0"]["kernel"].shape == (1, D, 2 * D)
    for batch in (1, 4):
        x = _x(batch, seed=10 + batch)
        assert ag.relative_difference(model.apply(z, x, train=False),
                                      sub.apply(sub.variables, x, train=False)) <= RTOL
        rngs = {"dropout": jax.random.key(batch)}
        full = model.apply(z, x, train=True, rngs=rngs)
        assert ag.relative_difference(full, sub.apply(sub.variables, x, train=True,
                                                      rngs=rngs)) <= RTOL
        assert ag.relative_difference(full, model.apply(z, x, train=False)) > 1e-3  # dropout on


def test_decoder_lm_scanned_groups_match_the_unrolled_model():
    tokens = jnp.zeros((2, 12), jnp.int32)
    sizes, macs = {}, {}
    for scan in (False, True):
        m = zoo.create("decoder_lm", scan_layers=scan, depth=2, dim=32, num_heads=4,
                       num_kv_heads=2, mlp_dim=64)
        v = m.init(jax.random.key(0), tokens, train=False)
        space = ag.generate_search_space(m.apply, v, tokens, train=False)
        sizes[scan] = [g.num_params for g in space.groups]
        macs[scan] = [g.macs for g in space.groups], ag.count_macs(m.apply, v, tokens, train=False)
    assert sizes[True] == sizes[False] and len(sizes[True]) == 4
    assert macs[True] == macs[False]  # every layer's MACs are counted under the scan too
    # the scanned model's sub-network at another batch size and sequence length
    z = space.zero_groups(v, [1, 2])  # layer 0's MLP, layer 1's attention
    sub = ag.construct_subnetwork(space, z)
    layers = sub.variables["params"]["layers"]["block"]
    assert layers["mlp"]["gate_proj"]["kernel"].shape[0] == 1
    assert layers["attn"]["q_proj"]["kernel"].shape[0] == 1
    x = jax.random.randint(jax.random.key(2), (3, 12), 0, 90)
    assert ag.relative_difference(m.apply(z, x, train=False),
                                  sub.apply(sub.variables, x, train=False)) <= RTOL


class _Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(D, rngs=rngs)
        self.up = nnx.Linear(D, 2 * D, rngs=rngs)
        self.down = nnx.Linear(2 * D, D, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)

    def __call__(self, x):
        return x + self.drop(self.down(nnx.gelu(self.up(self.norm(x)))))


class _NNXStack(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return _Block(rngs)

        self.blocks = make(rngs)
        self.head = nnx.Linear(D, 2, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(x, block):
            return block(x)

        return self.head(run(x, self.blocks))


def test_nnx_scan_over_a_vmapped_stack():
    model = _NNXStack(nnx.Rngs(0))
    model.eval()
    space = ag.generate_search_space(model, None, _x(2))
    assert space.num_groups == L
    assert "blocks/1/up" in space.summary().splitlines()[3]  # g1: named by attribute and layer
    params = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(params)
    zeroed = space.zero_groups({"params": pure, "state": space.variables["state"]}, [1])
    nnx.replace_by_pure_dict(params, zeroed["params"])
    nnx.update(model, params)
    sub = ag.construct_subnetwork(space, model)
    assert sub.blocks.up.kernel[...].shape == (L - 1, D, 2 * D)
    for batch in (1, 5):
        x = _x(batch, seed=20 + batch)
        assert ag.relative_difference(model(x), sub(x)) <= RTOL
    model.train()
    sub.train()
    x = _x(3, seed=30)
    first = model(x)
    assert ag.relative_difference(first, sub(x)) <= RTOL
    second = model(x)
    assert ag.relative_difference(second, sub(x)) <= RTOL
    assert ag.relative_difference(first, second) > 1e-3  # new dropout masks each call


class _BNLayer(nn.Module):
    train: bool

    @nn.compact
    def __call__(self, x, _):
        h = nn.BatchNorm(use_running_average=not self.train)(nn.Dense(2 * D)(x))
        return x + nn.Dense(D)(nn.relu(h)), None


def test_nn_scan_batch_statistics_of_the_kept_layers_update_in_train_mode():
    model = _ScanNet(_BNLayer)
    v = model.init(jax.random.key(0), _x(4))
    space = ag.generate_search_space(model.apply, v, _x(4), train=False)
    assert space.num_groups == L
    z = space.zero_groups(v, [1])
    sub = ag.construct_subnetwork(space, z)
    assert sub.variables["batch_stats"]["layers"]["BatchNorm_0"]["mean"].shape == (L - 1, 2 * D)
    x = _x(5, seed=40)
    assert ag.relative_difference(model.apply(z, x), sub.apply(sub.variables, x)) <= RTOL
    full, updates = model.apply(z, x, train=True, mutable=["batch_stats"])
    got, sub_updates = sub.apply(sub.variables, x, train=True, mutable=["batch_stats"])
    assert ag.relative_difference(full, got) <= RTOL
    kept = np.asarray(updates["batch_stats"]["layers"]["BatchNorm_0"]["mean"])[[0, 2]]
    np.testing.assert_allclose(sub_updates["batch_stats"]["layers"]["BatchNorm_0"]["mean"],
                               kept, rtol=RTOL, atol=1e-7)


def test_a_scanned_sub_network_checkpoints_and_exports(tmp_path):
    model = _ScanNet(_BNLayer)
    v = model.init(jax.random.key(0), _x(4))
    space = ag.generate_search_space(model.apply, v, _x(4), train=False)
    z = space.zero_groups(v, [0])
    sub = ag.construct_subnetwork(space, z)
    restored = ag.load_subnetwork(ag.save_subnetwork(tmp_path / "sub", sub), model.apply)
    assert restored.variables["params"]["layers"]["Dense_0"]["kernel"].shape == (L - 1, D, 2 * D)
    x = _x(3, seed=50)
    np.testing.assert_allclose(restored.apply(restored.variables, x),
                               sub.apply(sub.variables, x), rtol=1e-6)
    ag.export_subnetwork(sub, x[:2], path=tmp_path / "sub.jaxexp")
    loaded = ag.load_exported(tmp_path / "sub.jaxexp")
    for batch in (1, 6):
        xb = _x(batch, seed=60 + batch)
        assert ag.relative_difference(model.apply(z, xb), loaded(xb)) <= RTOL
