"""Train mode with randomness (Dropout, BatchNorm) and mixed precision."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import asgssd_jax as ag

RTOL = 1e-5


class DropNet(nn.Module):
    """Two Conv-BN branches, Dropout on one and after their sum, a residual conv."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        def bn(h):
            return nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)

        a = bn(nn.Conv(4, (3, 3), name="a")(x))
        b = nn.Dropout(0.5, deterministic=not train)(bn(nn.Conv(4, (3, 3), name="b")(x)))
        h = nn.Dropout(0.3, deterministic=not train)(jax.nn.relu(a + b))
        return nn.Dense(3)((h + nn.Conv(4, (3, 3), name="c")(h)).mean((1, 2)))


@pytest.fixture(scope="module")
def dropnet():
    model = DropNet()
    x = jnp.ones((2, 6, 6, 3))
    variables = model.init(jax.random.key(0), x)
    variables = jax.tree_util.tree_map(  # non-trivial BatchNorm statistics and parameters
        lambda a: a + 0.2 * jax.random.normal(jax.random.key(a.size), a.shape), variables)
    space = ag.generate_search_space(model.apply, variables, x, train=False)
    return model, variables, space


def _primitives(fn, variables, *args, **kwargs):
    """Primitive names of ``fn``'s program, nested calls inlined."""
    return [op.name for op in ag.trace_program(fn, variables, *args, **kwargs)[0].ops]


@pytest.mark.parametrize("removed", ["b", "c"])
def test_train_mode_with_dropout_rngs_and_batchnorm(dropnet, removed):
    model, variables, space = dropnet
    (g,) = [gr.index for gr in space.groups if f"params/{removed}/kernel" in gr.param_paths]
    vz = space.zero_groups(variables, [g])
    sub = ag.construct_subnetwork(space, vz)  # plans train mode with the model's rng streams
    for batch in (1, 3):  # traced at 2
        x = jax.random.normal(jax.random.key(batch), (batch, 6, 6, 3))
        rngs = {"dropout": jax.random.key(10 + batch)}
        ref, ref_state = model.apply(vz, x, train=True, rngs=rngs, mutable=["batch_stats"])
        out, state = sub.apply(sub.variables, x, train=True, rngs=rngs, mutable=["batch_stats"])
        assert ag.relative_difference(ref, out) <= RTOL  # the same dropout masks
        for col in state["batch_stats"]:
            for k in ("mean", "var"):
                np.testing.assert_allclose(state["batch_stats"][col][k],
                                           ref_state["batch_stats"][col][k], rtol=RTOL)
        # another key (a raw uint32 one too) gives other masks, in both networks alike
        other = {"dropout": jax.random.PRNGKey(99)}
        assert ag.relative_difference(
            model.apply(vz, x, train=True, rngs=other, mutable=["batch_stats"])[0],
            sub.apply(sub.variables, x, train=True, rngs=other, mutable=["batch_stats"])[0]
        ) <= RTOL
    if removed == "b":  # the removed branch's dropout draws no random bits any more
        x = jnp.ones((2, 6, 6, 3))
        rngs = {"dropout": jax.random.key(0)}
        kw = dict(train=True, rngs=rngs, mutable=["batch_stats"])
        full = _primitives(model.apply, vz, x, **kw)
        small = _primitives(sub.apply, sub.variables, x, **kw)
        assert 0 < small.count("random_bits") < full.count("random_bits")
    # gradients in train mode reach the kept parameters
    grads = jax.grad(lambda p: sub.apply({**sub.variables, "params": p}, x, train=True,
                                         rngs=rngs, mutable=["batch_stats"])[0].sum())(
        sub.variables["params"])
    assert all(np.isfinite(gr).all() for gr in jax.tree_util.tree_leaves(grads))


def test_train_mode_without_rngs_says_what_to_pass(dropnet):
    model, variables, space = dropnet
    sub = ag.construct_subnetwork(space, space.zero_groups(variables, [0]))
    with pytest.raises(ag.SurgeryError, match="rngs"):
        sub.apply(sub.variables, jnp.ones((1, 6, 6, 3)), train=True, mutable=["batch_stats"])


class CatNet(nn.Module):
    """Two conv branches concatenated, BatchNorm and a conv over the concat (Figure 4's
    pattern): removing a branch leaves a folded offset in the consuming conv."""

    dtype: object = jnp.float32
    param_dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = jnp.concatenate([nn.Conv(8, (3, 3), name="a", **kw)(x),
                             nn.Conv(8, (3, 3), name="b", **kw)(x)], -1)
        h = nn.BatchNorm(use_running_average=not train, **kw)(h)
        h = nn.Conv(16, (3, 3), name="c", **kw)(jax.nn.relu(h))
        return nn.Dense(3, **kw)(h.mean((1, 2)))


@pytest.mark.parametrize("dtype,param_dtype", [(jnp.bfloat16, jnp.bfloat16),
                                               (jnp.bfloat16, jnp.float32),
                                               (jnp.float32, jnp.float32)])
def test_mixed_precision_within_the_formats_own_error(dtype, param_dtype):
    """The sub-network differs from the zeroed network by no more than the zeroed network in
    ``dtype`` differs from float32 (float32 itself: 1e-5)."""
    model = CatNet(dtype, param_dtype)
    x = jax.random.normal(jax.random.key(3), (3, 6, 6, 3))
    variables = model.init(jax.random.key(0), x.astype(dtype))
    variables = jax.tree_util.tree_map(
        lambda a: a + 0.3 * jax.random.normal(jax.random.key(a.size), a.shape, a.dtype),
        variables)
    space = ag.generate_search_space(model.apply, variables, x.astype(dtype)[:2])
    (g,) = [gr.index for gr in space.groups if "params/a/kernel" in gr.param_paths]
    vz = space.zero_groups(variables, [g])
    sub = ag.construct_subnetwork(space, vz)
    ref = model.apply(vz, x.astype(dtype))
    out = sub.apply(sub.variables, x.astype(dtype))
    assert out.dtype == ref.dtype
    if dtype == jnp.float32:
        assert ag.relative_difference(ref, out) <= RTOL
        return
    ref32 = CatNet().apply(jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), vz), x)
    own_error = ag.relative_difference(ref32, ref)
    assert 0 < own_error < 0.05
    assert ag.relative_difference(ref, out) <= own_error
