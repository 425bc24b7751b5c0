"""The sub-network keeps the user's pytree: containers, empty collections, PRNG key leaves."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import asgssd_jax as ag

RTOL = 1e-5


def two_branch(get):
    """``apply_fn(variables, x)`` of a network with a concat of two dense branches; ``get``
    reads the named arrays out of the variables container."""

    def apply_fn(v, x):
        a = x @ get(v, "wa") + get(v, "ba")
        b = jnp.tanh(x @ get(v, "wb"))
        h = jax.nn.relu(jnp.concatenate([a, b], -1) * get(v, "scale"))
        return h @ get(v, "wout")

    return apply_fn


def named_arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {"wa": rng.normal(size=(5, 4)), "ba": rng.normal(size=(4,)),
            "wb": rng.normal(size=(5, 3)), "scale": 1 + 0.1 * rng.normal(size=(7,)),
            "wout": rng.normal(size=(7, 2))}


NAMES = ("wa", "ba", "wb", "scale", "wout")


@dataclasses.dataclass
class Weights:  # a dataclass pytree node, like a flax struct or an equinox module
    wa: jax.Array | None
    ba: jax.Array | None
    wb: jax.Array | None
    scale: jax.Array | None
    wout: jax.Array | None


jax.tree_util.register_dataclass(Weights, data_fields=list(NAMES), meta_fields=[])

CONTAINERS = {
    "flat_dict": (lambda d: d, lambda v, n: v[n]),
    "tuple": (lambda d: tuple(d[n] for n in NAMES), lambda v, n: v[NAMES.index(n)]),
    "list": (lambda d: [d[n] for n in NAMES], lambda v, n: v[NAMES.index(n)]),
    "dataclass": (lambda d: Weights(**d), lambda v, n: getattr(v, n)),
}


@pytest.mark.parametrize("kind", sorted(CONTAINERS))
def test_plain_function_of_any_container(kind):
    pack, get = CONTAINERS[kind]
    variables = pack({k: jnp.asarray(a, jnp.float32) for k, a in named_arrays().items()})
    apply_fn = two_branch(get)
    x = jax.random.normal(jax.random.key(0), (2, 5))
    space = ag.generate_search_space(apply_fn, variables, x)
    (g,) = [gr.index for gr in space.groups if any(p.endswith("wa") or p.endswith("0")
                                                    for p in gr.param_paths)]
    vz = space.zero_groups(variables, [g])
    sub = ag.construct_subnetwork(space, vz)
    kept = sub.variables
    assert type(kept) is type(variables)
    # the removed branch's leaves are gone (dict) or None (other nodes); the consumer is sliced
    if kind == "flat_dict":
        assert set(kept) == {"wb", "scale", "wout"}
    else:
        assert get(kept, "wa") is None and get(kept, "ba") is None
    assert get(kept, "wout").shape == (3, 2) and get(kept, "scale").shape == (3,)
    for b in (1, 2, 3):
        xb = jax.random.normal(jax.random.key(b), (b, 5))
        assert ag.relative_difference(apply_fn(vz, xb), sub.apply(kept, xb)) <= RTOL
    # and it trains: gradients have the sub-network's own structure
    grads = jax.grad(lambda v: sub.apply(v, x).sum())(kept)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(kept)


def _nnx_net(with_dropout: bool):
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(5, 4, rngs=rngs)
            self.b = nnx.Linear(5, 4, rngs=rngs)
            self.out = nnx.Linear(4, 2, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs) if with_dropout else None

        def __call__(self, x):
            h = self.a(x) + self.b(x)
            if self.drop is not None:
                h = self.drop(h)
            return self.out(jax.nn.relu(h))

    return Net(nnx.Rngs(0))


def test_nnx_module_with_parameters_only():
    """Every NNX transformer: no variable outside nnx.Param, so the "state" collection is empty
    and must stay (the original apply reads it)."""
    net = _nnx_net(False)
    x = jax.random.normal(jax.random.key(1), (3, 5))
    space = ag.generate_search_space(net, None, x)
    assert space.variables["state"] == {}
    vz = space.zero_groups(space.variables, [0])
    sub = ag.construct_subnetwork(space, vz)
    assert sub.variables["state"] == {} and len(sub.variables["params"]) == 2
    assert ag.relative_difference(space.apply_fn(vz, x), sub.apply(sub.variables, x)) <= RTOL


def test_prng_key_leaves_in_inference_and_checkpoints(tmp_path):
    """A model holding PRNG keys (nnx.Dropout(rngs=...)): key dtypes survive the plan, the
    sub-network's variables and an orbax round trip."""
    net = _nnx_net(True)
    net.eval()
    x = jax.random.normal(jax.random.key(2), (3, 5))
    space = ag.generate_search_space(net, None, x)
    keys = [p for p, a in zip(space.leaf_paths, jax.tree_util.tree_leaves(space.variables))
            if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)]
    assert keys  # the model does hold a key
    vz = space.zero_groups(space.variables, [0])
    sub = ag.construct_subnetwork(space, vz)
    assert ag.relative_difference(space.apply_fn(vz, x), sub.apply(sub.variables, x)) <= RTOL
    path = ag.save_subnetwork(tmp_path / "sub", sub)
    restored = ag.load_subnetwork(path, space.apply_fn)
    assert jax.tree_util.tree_structure(restored.variables) == \
        jax.tree_util.tree_structure(sub.variables)
    for a, b in zip(jax.tree_util.tree_leaves(restored.variables),
                    jax.tree_util.tree_leaves(sub.variables)):
        assert a.dtype == b.dtype
    np.testing.assert_array_equal(restored.apply(restored.variables, x),
                                  sub.apply(sub.variables, x))


def test_kept_prng_key_leaf_round_trips(tmp_path):
    """A plain function drawing a mask from a key it holds: the key is kept, saved and restored
    as a key, and the masks are the full network's."""
    base = two_branch(lambda v, n: v[n])

    def apply_fn(v, x):
        return base(v, x) * jax.random.bernoulli(v["key"], 0.6, (2,))

    variables = {k: jnp.asarray(a, jnp.float32) for k, a in named_arrays(1).items()}
    variables["key"] = jax.random.key(3)
    x = jax.random.normal(jax.random.key(4), (2, 5))
    space = ag.generate_search_space(apply_fn, variables, x)
    (g,) = [gr.index for gr in space.groups if "wa" in gr.param_paths]
    vz = space.zero_groups(variables, [g])
    sub = ag.construct_subnetwork(space, vz)
    assert jax.dtypes.issubdtype(sub.variables["key"].dtype, jax.dtypes.prng_key)
    x3 = jax.random.normal(jax.random.key(5), (3, 5))
    assert ag.relative_difference(apply_fn(vz, x3), sub.apply(sub.variables, x3)) <= RTOL
    restored = ag.load_subnetwork(ag.save_subnetwork(tmp_path / "sub", sub), apply_fn)
    assert restored.variables["key"].dtype == sub.variables["key"].dtype
    np.testing.assert_array_equal(jax.random.key_data(restored.variables["key"]),
                                  jax.random.key_data(sub.variables["key"]))
    np.testing.assert_array_equal(restored.apply(restored.variables, x3),
                                  sub.apply(sub.variables, x3))


def test_jax_export_of_a_tuple_container(tmp_path):
    """The exported artifact reloads with the sub-network's own tree (a tuple with None)."""
    pack, get = CONTAINERS["tuple"]
    variables = pack({k: jnp.asarray(a, jnp.float32) for k, a in named_arrays(2).items()})
    apply_fn = two_branch(get)
    x = jax.random.normal(jax.random.key(6), (2, 5))
    space = ag.generate_search_space(apply_fn, variables, x)
    (g,) = [gr.index for gr in space.groups if "0" in gr.param_paths]
    vz = space.zero_groups(variables, [g])
    sub = ag.construct_subnetwork(space, vz)
    ag.export_subnetwork(sub, x, path=tmp_path / "sub.jaxexp")
    loaded = ag.load_exported(tmp_path / "sub.jaxexp")
    assert jax.tree_util.tree_structure(loaded.variables) == \
        jax.tree_util.tree_structure(sub.variables)
    x4 = jax.random.normal(jax.random.key(7), (4, 5))
    assert ag.relative_difference(apply_fn(vz, x4), loaded(x4)) <= RTOL
