"""Flax NNX front-end: a trained nnx.Module in, an nnx.Module out (train and eval modes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import asgssd_jax as ag

RTOL = 1e-5


class CNN(nnx.Module):
    """Two conv branches concatenated, BatchNorm and Dropout over the concat."""

    def __init__(self, rngs: nnx.Rngs):
        self.a = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.b = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.c = nnx.Conv(8, 5, (3, 3), rngs=rngs)
        self.out = nnx.Linear(5, 2, rngs=rngs)

    def __call__(self, x):
        h = jnp.concatenate([self.a(x), self.b(x)], -1)
        return self.out(nnx.relu(self.c(self.drop(self.bn(h)))).mean((1, 2)))


@pytest.fixture()
def trained_cnn():
    """A CNN whose branch ``a`` was driven to zero after the space was generated (as H2SPG
    does), with non-trivial BatchNorm statistics."""
    model = CNN(nnx.Rngs(0))
    space = ag.generate_search_space(model, None, jnp.ones((2, 6, 6, 3)))
    model.bn.mean[...] = jnp.linspace(-0.5, 0.5, 8)
    model.bn.bias[...] = jnp.linspace(-1.0, 1.0, 8)
    model.a.kernel[...] = 0.0
    model.a.bias[...] = 0.0
    return model, space


def test_nnx_module_in_nnx_module_out_eval_and_train(trained_cnn):
    model, space = trained_cnn
    sub = ag.construct_subnetwork(space, model)  # the module's current state, not a snapshot
    assert isinstance(sub, nnx.Module)
    state = nnx.state(sub)
    assert "a" not in state and isinstance(sub.c.kernel, nnx.Param)
    assert isinstance(sub.bn.mean, nnx.BatchStat) and isinstance(sub.drop.rngs.key, nnx.RngKey)
    model.eval()
    sub.eval()
    for b in (1, 3):
        x = jax.random.normal(jax.random.key(b), (b, 6, 6, 3))
        assert ag.relative_difference(model(x), sub(x)) <= RTOL
    # train mode: the same Dropout masks (rng streams advance alike) and BatchNorm updates
    model.train()
    sub.train()
    x = jax.random.normal(jax.random.key(4), (3, 6, 6, 3))
    first = model(x)
    assert ag.relative_difference(first, sub(x)) <= RTOL
    second = model(x)
    assert ag.relative_difference(second, sub(x)) <= RTOL
    assert ag.relative_difference(first, second) > 0.01  # new masks on the second call
    np.testing.assert_allclose(sub.bn.mean[...], model.bn.mean[...][-len(sub.bn.mean[...]):],
                               rtol=RTOL, atol=1e-7)


def test_nnx_sub_network_fine_tunes_splits_and_merges(trained_cnn):
    model, space = trained_cnn
    sub = ag.construct_subnetwork(space, model)
    sub.train()
    opt = nnx.Optimizer(sub, optax.adam(1e-2), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(5), (4, 6, 6, 3))

    @nnx.jit
    def step(sub, opt, x):
        loss, grads = nnx.value_and_grad(lambda s: jnp.mean(s(x) ** 2))(sub)
        opt.update(sub, grads)
        return loss

    losses = [float(step(sub, opt, x)) for _ in range(4)]
    assert losses[-1] < losses[0]
    sub.eval()
    graphdef, state = nnx.split(sub)
    again = nnx.merge(graphdef, state)
    np.testing.assert_array_equal(again(x), sub(x))


def test_nnx_sub_network_save_load_and_export(trained_cnn, tmp_path):
    model, space = trained_cnn
    sub = ag.construct_subnetwork(space, model)
    sub.eval()
    x = jax.random.normal(jax.random.key(6), (3, 6, 6, 3))
    path = ag.save_subnetwork(tmp_path / "sub", sub)
    restored = ag.load_subnetwork(path, CNN(nnx.Rngs(1)))  # the class; its values unused
    assert isinstance(restored, nnx.Module)
    restored.eval()
    np.testing.assert_array_equal(restored(x), sub(x))
    exported = ag.export_subnetwork(sub, x[:1], path=tmp_path / "sub.jaxexp")
    np.testing.assert_allclose(ag.load_exported(tmp_path / "sub.jaxexp")(x), sub(x),
                               rtol=1e-6, atol=1e-6)
    assert "batch" in str(exported.exported.in_avals[-1].shape)


class Block(nnx.Module):
    """A pre-norm transformer block: attention and MLP branches added to the residual."""

    def __init__(self, d: int, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(2, d, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(d, rngs=rngs)
        self.mlp = nnx.Sequential(nnx.Linear(d, 2 * d, rngs=rngs), nnx.gelu,
                                  nnx.Linear(2 * d, d, rngs=rngs))

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nnx.Module):
    """Only nnx.Param variables; blocks in an nnx.List."""

    def __init__(self, rngs: nnx.Rngs, d: int = 8, depth: int = 2):
        self.embed = nnx.Linear(3, d, rngs=rngs)
        self.blocks = nnx.List([Block(d, rngs) for _ in range(depth)])
        self.head = nnx.Linear(d, 2, rngs=rngs)

    def __call__(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(1))


def test_nnx_transformer_with_parameters_only():
    model = Transformer(nnx.Rngs(0))
    x = jnp.ones((2, 5, 3))
    space = ag.generate_search_space(model, None, x)
    assert space.num_groups >= 4  # attention and MLP branch of each block
    groups = [gr for gr in space.groups if any("blocks/1/mlp" in p for p in gr.param_paths)]
    assert groups
    zeroed = space.zero_groups(space.variables, [groups[0].index])
    nnx.update(model, _from_pure(model, zeroed))
    sub = ag.construct_subnetwork(space, model)
    model.eval()
    sub.eval()
    for b in (1, 3):
        xb = jax.random.normal(jax.random.key(b), (b, 5, 3))
        assert ag.relative_difference(model(xb), sub(xb)) <= RTOL
    assert ag.count_params(sub) < ag.count_params(space.variables)


def _from_pure(model, variables):
    """The module's state with the values of ``{"params": ..., "state": ...}``."""
    _, params, rest = nnx.split(model, nnx.Param, ...)
    nnx.replace_by_pure_dict(params, variables["params"])
    nnx.replace_by_pure_dict(rest, variables["state"])
    return nnx.merge_state(params, rest)


def test_the_trace_time_snapshot_is_not_taken_silently(trained_cnn):
    model, space = trained_cnn
    with pytest.warns(UserWarning, match="snapshot"):
        ag.construct_subnetwork(space, space.variables)
    with pytest.raises(ag.SurgeryError, match="nnx.state\\(model\\)"):
        ag.construct_subnetwork(space, nnx.state(model, nnx.Param))  # a part of the state


def test_an_nnx_state_gives_the_modules_sub_network(trained_cnn):
    model, space = trained_cnn
    sub = ag.construct_subnetwork(space, nnx.state(model))  # e.g. restored from a checkpoint
    assert isinstance(sub, nnx.Module) and "a" not in nnx.state(sub)
    model.eval()
    x = jax.random.normal(jax.random.key(5), (3, 6, 6, 3))
    assert ag.relative_difference(model(x), sub(x)) <= RTOL
