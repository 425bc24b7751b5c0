"""Search-space generation: DemoNet (the paper's Figures 2-3) and hand-built cases."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import asgssd_jax as ag
import asgssd_zoo as models


def _space(module, shape=(6, 6, 3), **kw):
    x = jnp.ones((2, *shape))
    v = module.init(jax.random.key(0), x)
    return ag.generate_search_space(module.apply, v, x, **kw), v


def _group_modules(space) -> list[set[str]]:
    return [{p.split("/")[1] for p in g.param_paths} for g in space.groups]


# --------------------------------------------------------------------------------------------
# DemoNet


@pytest.fixture(scope="module")
def demonet_space():
    m = models.create("demonet")
    x = jnp.ones((2, *models.input_shape("demonet")))
    v = m.init(jax.random.key(0), x)
    return ag.generate_search_space(m.apply, v, x, train=False), v


def test_demonet_has_the_papers_five_removal_structures(demonet_space):
    space, _ = demonet_space
    assert space.num_groups == 5
    assert _group_modules(space) == [{"conv2"}, {"conv3"}, {"conv4", "conv5"}, {"conv7"},
                                     {"conv8"}]
    # Conv1-BN1 and Conv6-BN6 are in G_s^C, and so are the linear layers.
    comp = {p.split("/")[1] for p in space.complement_paths}
    assert comp == {"conv1", "conv6", "linear1", "linear2"}
    g2 = space.groups[0]
    assert set(g2.param_paths) == {"params/conv2/conv/kernel", "params/conv2/bn/scale",
                                   "params/conv2/bn/bias"}
    assert g2.num_params == 64 * 32 * 9 + 64
    assert g2.macs == pytest.approx(28 * 28 * 32 * 64 * 9)


def test_demonet_figure3_validity(demonet_space):
    space, _ = demonet_space
    g2, g3, g45, g7, g8 = range(5)
    assert space.is_valid([g8])
    assert not space.is_valid([g8, g7])  # Figure 3: with g8 removed, g7 is the only path
    assert space.is_valid([g2, g3, g8])  # the paper's K = 3 outcome
    assert not space.is_valid([g2, g3, g45])
    for subset in ([], [g7], [g2, g3, g8], [g7, g8], [g2, g3, g45, g7]):
        mask = np.zeros(5, bool)
        mask[list(subset)] = True
        assert bool(jax.jit(space.is_valid_mask)(mask)) == space.is_valid(subset)


def test_demonet_segment_graph(demonet_space):
    space, _ = demonet_space
    sg = space.segment_graph
    # input, Conv1-BN1, 3 branches, Concat-Conv6, Conv7, Conv8, Add-head, output
    assert sg.graph.number_of_nodes() == 10
    conv1 = sg.segment_of[next(iter(sg.trace.graph.successors(sg.trace.inputs[0])))]
    assert sg.graph.out_degree(conv1) == 3


def test_zero_groups_and_norms(demonet_space):
    space, v = demonet_space
    norms = space.group_norms(v)
    assert norms.shape == (5,) and bool(jnp.all(norms > 0))
    z = space.zero_groups(v, [0, 4])
    zn = jax.jit(space.group_norms)(z)
    assert float(zn[0]) == 0 and float(zn[4]) == 0 and float(zn[1]) > 0
    assert space.zero_group_indices(z) == [0, 4]
    # batch_stats untouched, G_s^C untouched, the input tree unchanged
    assert jnp.array_equal(z["params"]["conv1"]["conv"]["kernel"],
                           v["params"]["conv1"]["conv"]["kernel"])
    assert space.zero_group_indices(v) == []
    # works on the params collection alone, as an optimizer sees it
    zp = space.zero_groups(v["params"], [1])
    assert float(jnp.abs(zp["conv3"]["conv"]["kernel"]).max()) == 0
    with pytest.raises(IndexError, match="out of range"):
        space.zero_groups(v, [7])


def test_summary_is_a_table(demonet_space):
    space, _ = demonet_space
    text = space.summary()
    assert "g0" in text and "conv7" in text and "G_s^C" in text
    assert "14.45M" in text
    # Operations outside a module are named as a paper names them, not by primitive chains.
    row = next(line for line in text.splitlines() if line.startswith("g2 "))
    assert row.endswith("AvgPool, conv4/conv, conv4/bn, ReLU, conv5/conv, conv5/bn")


def test_count_macs_and_params_follow_the_papers_convention(demonet_space):
    space, v = demonet_space
    m = models.create("demonet")
    x = jnp.ones((3, 28, 28, 1))
    assert ag.count_params(v) == 847_498
    assert ag.count_macs(m.apply, v, x) == 202_795_264  # per example, batch 3


# --------------------------------------------------------------------------------------------
# Hand-built cases for each definition


class TwoBranch(nn.Module):
    join: str = "add"

    @nn.compact
    def __call__(self, x):
        a = nn.Conv(4, (3, 3), name="a")(x)
        b = nn.Conv(4, (3, 3), name="b")(x)
        if self.join == "add":
            y = a + b
        elif self.join == "sub":
            y = a - b
        elif self.join == "mul":
            y = a * b
        else:
            y = jnp.concatenate([a, b], -1)
        y = nn.Conv(5, (1, 1), name="head")(y)
        return y.mean((1, 2))


@pytest.mark.parametrize("join", ["add", "sub", "concat"])
def test_tolerant_joints_make_branches_removable(join):
    space, _ = _space(TwoBranch(join))
    assert _group_modules(space) == [{"a"}, {"b"}]
    assert space.is_valid([0]) and space.is_valid([1]) and not space.is_valid([0, 1])


def test_multiply_joint_does_not_make_a_branch_removable():
    space, _ = _space(TwoBranch("mul"))
    assert space.num_groups == 0


class Gate(nn.Module):
    """A squeeze-excitation style gate inside a residual branch."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (1, 1), name="stem")(x)
        h = jax.nn.relu(nn.Conv(4, (3, 3), name="conv")(x))
        s = jax.nn.sigmoid(nn.Dense(4, name="gate")(h.mean((1, 2), keepdims=True)))
        h = nn.Conv(4, (1, 1), name="proj")(h * s)
        y = x + h
        return nn.Dense(3, name="out")(y.mean((1, 2)))


def test_gate_is_inside_a_removal_structure_not_one_itself():
    space, _ = _space(Gate())
    assert _group_modules(space) == [{"conv", "gate", "proj"}]


class Fanout(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jax.nn.silu(nn.Conv(4, (3, 3), name="c1")(x))  # multi-outgoing vertex
        y = nn.Conv(4, (3, 3), name="c2")(x) + nn.Conv(4, (3, 3), name="c3")(x) + x
        return y.mean((1, 2))


def test_multi_outgoing_vertex_is_not_removable_and_silu_is_one_operator():
    space, _ = _space(Fanout())
    assert _group_modules(space) == [{"c2"}, {"c3"}]
    # the identity path keeps the output reachable with both branches gone
    assert space.is_valid([0, 1])


class Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
        d = nn.Dense(3, name="shared")
        y = d(x) + d(jax.nn.relu(x)) + nn.Dense(3, name="own")(x)
        return y.sum(-1)


def test_weight_sharing_makes_neither_use_removable():
    space, _ = _space(Shared(), shape=(3,))
    assert _group_modules(space) == [{"own"}]


class WithScan(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.ones, (x.shape[-1],))

        def step(c, xi):
            return c * w + xi, c

        def body(h):
            c, _ = jax.lax.scan(step, jnp.zeros_like(h[:, 0]), jnp.swapaxes(h, 0, 1))
            return c

        a = body(x)
        b = nn.Dense(x.shape[-1], name="dense")(x[:, 0])
        branch = jax.lax.cond(True, lambda z: z * 2.0, lambda z: z, b)
        return a + branch


def test_scan_and_cond_are_opaque_vertices_never_removable():
    space, _ = _space(WithScan(), shape=(5, 3))
    prims = {p for v in space.trace.vertices.values() for p in v.primitives}
    assert {"scan", "cond"} <= prims
    assert space.num_groups == 0


@jax.custom_jvp
def my_act(x):
    return jnp.where(x > 0, x, 0.1 * x)


@my_act.defjvp
def _my_act_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return my_act(x), jnp.where(x > 0, 1.0, 0.1) * t


class CustomAct(nn.Module):
    @nn.compact
    def __call__(self, x):
        return my_act(nn.Dense(4, name="a")(x)) + nn.Dense(4, name="b")(x)


def test_custom_jvp_activation_is_inlined():
    space, _ = _space(CustomAct(), shape=(3,))
    assert _group_modules(space) == [{"a"}, {"b"}]
    assert "custom_jvp_call" not in {o.name for o in space.trace.program.ops}


class NNXBranches(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(3, 4, rngs=rngs)
        self.b = nnx.Linear(3, 4, rngs=rngs)
        self.out = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.a(x)) + self.b(x))


def test_nnx_model():
    model = NNXBranches(nnx.Rngs(0))
    space = ag.generate_search_space(model, None, jnp.ones((2, 3)))
    assert [set(g.param_paths) for g in space.groups] == [
        {"params/a/kernel", "params/a/bias"}, {"params/b/kernel", "params/b/bias"}]
    z = space.zero_groups(space.variables, [0])
    assert float(space.group_norms(z)[0]) == 0


def test_plain_function_over_a_params_dict():
    def f(p, x):
        h = jnp.tanh(x @ p["w1"]) @ p["w2"] + x @ p["skip"]
        return h @ p["out"]

    p = {"w1": jnp.ones((3, 5)), "w2": jnp.ones((5, 3)), "skip": jnp.eye(3),
         "out": jnp.ones((3, 1))}
    space = ag.generate_search_space(f, p, jnp.ones((4, 3)))
    assert [set(g.param_paths) for g in space.groups] == [{"w1", "w2"}, {"skip"}]
    assert ag.count_macs(f, p, jnp.ones((4, 3))) == 15 + 15 + 9 + 3


# --------------------------------------------------------------------------------------------
# Bad input


def test_sample_that_does_not_trace_says_what_to_do():
    m = models.create("demonet")
    v = m.init(jax.random.key(0), jnp.ones((1, 28, 28, 1)))
    with pytest.raises(ag.TraceError, match="could not be traced with sample inputs of shape"):
        ag.generate_search_space(m.apply, v, jnp.ones((1, 28, 28, 3)))


def test_non_array_leaf():
    with pytest.raises(ag.TraceError, match="'cfg/name' is a str, not an array"):
        ag.generate_search_space(lambda p, x: x * 2, {"cfg": {"name": "x"}}, jnp.ones(3))


def test_output_independent_of_input():
    with pytest.raises(ag.TraceError, match="does not depend on its input"):
        ag.generate_search_space(lambda p, x: p["w"] * 2, {"w": jnp.ones(3)}, jnp.ones(3))


def test_empty_model_has_an_empty_search_space():
    space = ag.generate_search_space(lambda p, x: jax.nn.relu(x) + x, {}, jnp.ones((2, 3)))
    assert space.num_groups == 0 and space.is_valid([])
    assert "0 removal structures" in space.summary()


def test_no_sample_input():
    with pytest.raises(ag.TraceError, match="no sample input"):
        ag.generate_search_space(lambda p: p, {"w": jnp.ones(3)})


def test_unknown_primitive_is_an_ordinary_vertex():
    from jax.extend.core import Primitive
    from jax.interpreters import mlir

    prim = Primitive("my_unknown_op")
    prim.def_impl(lambda x: x * 3.0)
    prim.def_abstract_eval(lambda x: x)
    mlir.register_lowering(prim, mlir.lower_fun(lambda x: x * 3.0, multiple_results=False))

    def f(p, x):
        return prim.bind(x @ p["a"]) + x @ p["b"]

    p = {"a": jnp.ones((3, 3)), "b": jnp.ones((3, 3))}
    space = ag.generate_search_space(f, p, jnp.ones((2, 3)))
    assert "my_unknown_op" in {o.name for o in space.trace.program.ops}
    assert [set(g.param_paths) for g in space.groups] == [{"a"}, {"b"}]


def test_params_tree_that_does_not_match(demonet_space):
    space, _ = demonet_space
    with pytest.raises(ValueError, match="not in the search space"):
        space.group_norms({"w": jnp.ones(3)})
