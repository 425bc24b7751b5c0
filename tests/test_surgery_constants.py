"""Folded constants: right at every batch size (heads merged into the batch) and 0-d."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import asgssd_jax as ag

RTOL = 1e-5


class HeadsIntoBatch(nn.Module):
    """Attention that reshapes [B, T, D] -> [B*H, T, D/H] (as diffusion UNets do), with a
    removable conditioning branch added to a sinusoidal embedding: removed, the branch leaves
    a constant that differs per head along the merged batch axis."""

    heads: int = 2

    @nn.compact
    def __call__(self, x, train: bool = False):
        b, t, d = x.shape
        h = self.heads

        def split(z):
            return z.reshape(b, t, h, d // h).transpose(0, 2, 1, 3).reshape(b * h, t, d // h)

        pos = jnp.sin(jnp.arange(t * d, dtype=x.dtype).reshape(t, d) * 0.37)
        q = split(nn.Dense(d, name="q")(x)) + split(nn.Dense(d, name="cond")(x) + pos)
        k = split(nn.Dense(d, name="k")(x))
        att = jax.nn.softmax(q @ k.transpose(0, 2, 1), -1) @ k
        out = att.reshape(b, h, t, d // h).transpose(0, 2, 1, 3).reshape(b, t, d)
        return nn.Dense(3, name="head")(out.mean(1))


@pytest.mark.parametrize("traced_batch", [1, 2])
def test_constant_merged_with_the_batch_is_right_at_every_batch_size(traced_batch):
    model = HeadsIntoBatch()
    x = jnp.ones((traced_batch, 4, 8))
    variables = model.init(jax.random.key(0), x)
    space = ag.generate_search_space(model.apply, variables, x)
    (g,) = [gr.index for gr in space.groups if "params/cond/kernel" in gr.param_paths]
    vz = space.zero_groups(variables, [g])
    sub = ag.construct_subnetwork(space, vz)
    assert "cond" not in sub.variables["params"]
    for b in sorted({1, traced_batch, 3}):
        xb = jax.random.normal(jax.random.key(b), (b, 4, 8))
        assert ag.relative_difference(model.apply(vz, xb), sub.apply(sub.variables, xb)) <= RTOL
    # the stored constant does not carry the traced batch: jit at a new batch size works too
    x5 = jax.random.normal(jax.random.key(5), (5, 4, 8))
    assert ag.relative_difference(model.apply(vz, x5),
                                  jax.jit(sub.apply)(sub.variables, x5)) <= RTOL


class GatedWithRegulariser(nn.Module):
    """FairDARTS-style ``sigmoid(a) * op(x)`` gates with scalar ``a``, returning next to the
    logits a regulariser computed from the gate parameters alone (a 0-d output)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Conv(4, (3, 3), name="stem")(x)
        out, gates = 0.0, []
        for i in range(3):
            a = self.param(f"a{i}", nn.initializers.constant(0.3 * i - 0.2), ())
            gates.append(jax.nn.sigmoid(a))
            out = out + gates[-1] * nn.Conv(4, (3, 3), name=f"op{i}")(h)
        logits = nn.Dense(3)(out.mean((1, 2)))
        return logits, sum(jnp.square(g - 0.5) for g in gates)


def test_scalar_constants_stay_scalars():
    model = GatedWithRegulariser()
    x = jnp.ones((2, 6, 6, 3))
    variables = model.init(jax.random.key(0), x)
    space = ag.generate_search_space(model.apply, variables, x)
    (g,) = [gr.index for gr in space.groups if "params/a1" in gr.param_paths]
    vz = space.zero_groups(variables, [g])
    sub = ag.construct_subnetwork(space, vz)
    assert "a1" not in sub.variables["params"]
    for b in (1, 3):
        xb = jax.random.normal(jax.random.key(b), (b, 6, 6, 3))
        ref, got = model.apply(vz, xb), sub.apply(sub.variables, xb)
        assert got[1].shape == ()
        assert ag.relative_difference(ref, got) <= RTOL
