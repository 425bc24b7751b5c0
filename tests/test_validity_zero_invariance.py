"""Zero-invariance: a candidate whose zeroed group does not remove it is not in G_s."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import asgssd_jax as ag
from asgssd_jax.zero_invariance import CONST, DATA, ZERO, propagate_zeros


class WeightNormDense(nn.Module):
    """``g * v / ||v||`` as a kernel: 0/0 at zero."""

    features: int

    @nn.compact
    def __call__(self, x):
        v = self.param("v", nn.initializers.normal(1.0), (x.shape[-1], self.features))
        g = self.param("g", nn.initializers.ones, (self.features,))
        return x @ (g * v / jnp.linalg.norm(v, axis=0))


class Residual(nn.Module):
    """``x + branch(x)`` with a plain Dense branch and a weight-normalised one."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, name="stem")(x)
        x = x + nn.Dense(8, name="plain")(nn.relu(x))
        x = x + WeightNormDense(8, name="wn")(nn.relu(x))
        return nn.Dense(3, name="head")(x)


class GatedPool(nn.Module):
    """DARTS-style edge mix: ``sigmoid(a) * avg_pool(x) + conv-bn(x)``."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), name="stem")(x)
        a = self.param("gate", nn.initializers.zeros, (4,))
        pool = nn.avg_pool(x, (3, 3), padding="SAME")
        conv = nn.BatchNorm(use_running_average=not train, name="bn")(
            nn.Conv(4, (3, 3), name="conv")(x))
        x = x + jax.nn.sigmoid(a) * pool + conv
        return nn.Dense(2, name="head")(x.mean(axis=(1, 2)))


def _space(module, x, **kw):
    v = module.init(jax.random.key(0), x, **kw)
    return ag.generate_search_space(module.apply, v, x, **kw), v


def _modules(space):
    return [{p.split("/")[1] for p in g.param_paths} for g in space.groups]


def test_weight_normalised_kernel_is_excluded_as_not_finite():
    space, v = _space(Residual(), jnp.ones((2, 5)))
    assert _modules(space) == [{"plain"}]
    (ex,) = space.excluded
    assert set(ex.param_paths) == {"params/wn/v", "params/wn/g"}
    assert "not finite" in ex.reason
    assert "excluded" in space.summary() and "params/wn/v" in space.summary()
    # the exclusion is right: zeroing wn's leaves poisons the network
    z = jax.tree_util.tree_map(lambda x: x, v)
    z["params"]["wn"] = jax.tree_util.tree_map(jnp.zeros_like, z["params"]["wn"])
    assert np.isnan(np.asarray(Residual().apply(z, jnp.ones((2, 5))))).all()


def test_gate_on_a_parameter_free_branch_is_excluded():
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
    space, _ = _space(GatedPool(), x)
    # conv-bn stays a removal structure; the gate does not
    assert _modules(space) == [{"conv", "bn"}]
    (ex,) = space.excluded
    assert ex.param_paths == ("params/gate",)
    assert "depends on its input" in ex.reason


def test_zero_propagation_lattice():
    def f(w, b, x):
        h = x @ w  # killed by a zero w
        gate = jax.nn.sigmoid(b) * x  # sigmoid(0) = 0.5: still data
        return h, gate, jnp.tanh(w).sum() + 1.0

    w, b, x = jnp.ones((3, 3)), jnp.ones(3), jnp.ones((2, 3))
    prog, _, _ = ag.trace_program(lambda v, x: f(v["w"], v["b"], x), {"b": b, "w": w}, x)
    kinds = {prog.leaf_vars[0]: CONST, prog.leaf_vars[1]: ZERO, prog.arg_vars[0]: DATA}
    kinds = propagate_zeros(prog, range(len(prog.ops)), kinds)
    assert [kinds[o] for o in prog.outvars] == [ZERO, DATA, CONST]
