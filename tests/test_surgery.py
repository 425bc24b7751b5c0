"""Sub-network construction (Section 3.3): exactness, Figure 4, training, errors."""

from __future__ import annotations

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asgssd_jax as ag
import asgssd_zoo as models
from asgssd_jax.trace import leaf_path
from tests.archgen import RandomNet, in_container, random_container, random_network

RTOL = 1e-5  # the exactness aim of DESIGN.md, float32


def fast_init(module, input_shape, seed: int = 0, batch: int = 2):
    """Random variables with non-trivial BatchNorm statistics, drawn with numpy (no compiles)."""
    x = jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32)
    spec = jax.eval_shape(module.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = leaf_path(path).split("/")
        if name[0] == "batch_stats":
            val = 0.5 + rng.uniform(size=s.shape) if name[-1] == "var" else \
                0.1 * rng.normal(size=s.shape)
        elif name[-1] == "scale":
            val = 1 + 0.1 * rng.normal(size=s.shape)
        elif name[-1] == "bias":
            val = 0.1 * rng.normal(size=s.shape)
        else:
            val = rng.normal(size=s.shape) / math.sqrt(max(1, math.prod(s.shape[:-1])))
        return jnp.asarray(val, s.dtype)

    return jax.tree_util.tree_map_with_path(fill, spec)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def random_valid_set(space, rnd, at_least: int = 0):
    """A random valid zero set: groups in random order, each kept if the set stays valid."""
    order = list(range(space.num_groups))
    rnd.shuffle(order)
    target = rnd.randint(min(at_least, space.num_groups), space.num_groups)
    chosen: list[int] = []
    for g in order:
        if len(chosen) < target and space.is_valid(chosen + [g]):
            chosen.append(g)
    return sorted(chosen)


def _maybe_jit(fn, jit):
    return jax.jit(fn) if jit else fn


def check_exact(module, space, variables, zero, x, train_check=False, jit=False, apply_fn=None):
    """Builds the sub-network of ``zero`` and checks it against the zeroed network.

    ``jit`` compiles both sides (cheaper than op-by-op dispatch for bigger networks);
    ``apply_fn`` (default ``module.apply``) is the function the space was generated from."""
    apply_fn = module.apply if apply_fn is None else apply_fn
    vz = space.zero_groups(variables, zero)
    sub = ag.construct_subnetwork(space, vz)
    assert sub.removed_groups == tuple(zero)
    ref = _maybe_jit(lambda v, x: apply_fn(v, x, train=False), jit)(vz, x)
    out = _maybe_jit(lambda v, x: sub.apply(v, x), jit)(sub.variables, x)
    assert out.shape == ref.shape
    err = rel_err(out, ref)
    assert err <= RTOL, (zero, err)
    assert ag.count_params(sub) <= ag.count_params(vz)
    if train_check:
        check_train_mode(module, sub, vz, x, jit)
    return sub, err


def check_train_mode(module, sub, vz, x, jit=False):
    """Train mode equals the zeroed network's, BatchNorm statistics and Dropout masks
    included."""
    rngs = {"dropout": jax.random.key(17)}
    ref, ref_state = _maybe_jit(lambda v, x: module.apply(
        v, x, train=True, rngs=rngs, mutable=["batch_stats"]), jit)(vz, x)
    out, state = _maybe_jit(lambda v, x: sub.apply(
        v, x, train=True, rngs=rngs, mutable=["batch_stats"]), jit)(sub.variables, x)
    assert rel_err(out, ref) <= RTOL
    want = {leaf_path(p): a for p, a in jax.tree_util.tree_flatten_with_path(ref_state)[0]}
    plan = sub.plan
    for path, got in jax.tree_util.tree_flatten_with_path(state)[0]:
        path = leaf_path(path)
        i = plan.leaf_paths.index(path)
        expected = np.asarray(want[path])
        m = plan.leaf_slices.get(i)
        if m is not None:
            expected = np.take(expected, m[2], axis=m[0])
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# DemoNet and the paper's Figure 4


@pytest.fixture(scope="module")
def demonet():
    model = models.create("demonet")
    x = jnp.ones((2, 28, 28, 1))
    variables = fast_init(model, (28, 28, 1))
    space = ag.generate_search_space(model.apply, variables, x, train=False)
    return model, variables, space


def _groups_by_module(space):
    return {gr.param_paths[0].split("/")[1]: gr.index for gr in space.groups}


def test_figure4_structures_joints_and_conv6_columns_are_removed(demonet):
    model, variables, space = demonet
    g = _groups_by_module(space)
    zero = sorted([g["conv2"], g["conv3"], g["conv8"]])  # Conv2-BN2, MaxPool-Conv3-BN3, Conv8-BN8
    x = jax.random.normal(jax.random.key(1), (3, 28, 28, 1))
    sub, _ = check_exact(model, space, variables, zero, x, train_check=True, jit=True)

    # neither the removed structures nor their BatchNorm statistics remain
    for col in ("params", "batch_stats"):
        assert not {"conv2", "conv3", "conv8"} & set(sub.variables[col])
        assert {"conv1", "conv4", "conv5", "conv6", "conv7"} <= set(sub.variables[col])
    # Conv6 lost the input channels (kernel columns) of Conv2 and Conv3: the first 64 of 128
    k6 = variables["params"]["conv6"]["conv"]["kernel"]
    k6_sub = sub.variables["params"]["conv6"]["conv"]["kernel"]
    assert k6.shape == (3, 3, 128, 128) and k6_sub.shape == (3, 3, 64, 128)
    np.testing.assert_array_equal(k6_sub, k6[:, :, 64:, :])
    # the Concat and the Add became unnecessary; the MaxPool went with Conv3
    t = ag.trace(sub.apply, sub.variables, x)
    prims = {p for v in t.vertices.values() for p in v.primitives}
    assert "concatenate" not in prims and "reduce_window_max" not in prims
    assert not any(t.is_tolerant_joint(v) for v in t.vertices)
    assert sum("conv_general_dilated" in v.primitives for v in t.vertices.values()) == 5
    # smaller figures, exactly the removed ones
    removed = sum(space.groups[i].num_params for i in zero) + 3 * 3 * 64 * 128
    assert ag.count_params(sub) == ag.count_params(variables) - removed
    full_macs = ag.count_macs(model.apply, variables, x, train=False)
    sub_macs = ag.count_macs(sub.apply, sub.variables, x)
    removed_macs = sum(space.groups[i].macs for i in zero) + 14 * 14 * 128 * 9 * 64
    assert sub_macs == pytest.approx(full_macs - removed_macs)


def test_demonet_every_valid_zero_set_is_exact(demonet):
    model, variables, space = demonet
    x = jax.random.normal(jax.random.key(2), (3, 28, 28, 1))
    checked = 0
    for k in range(space.num_groups + 1):
        for zero in itertools.combinations(range(space.num_groups), k):
            if not space.is_valid(zero):
                with pytest.raises(ag.SurgeryError, match="invalid set"):
                    ag.construct_subnetwork(space, space.zero_groups(variables, zero))
                continue
            check_exact(model, space, variables, list(zero), x)
            checked += 1
    assert checked == 21  # not both of g7, g8, nor all three concat inputs g2, g3, g45


def test_no_zero_group_gives_the_full_network(demonet):
    model, variables, space = demonet
    sub = ag.construct_subnetwork(space, variables)
    assert sub.removed_groups == ()
    assert ag.count_params(sub) == ag.count_params(variables)
    x = jax.random.normal(jax.random.key(3), (1, 28, 28, 1))
    assert rel_err(jax.jit(sub.apply)(sub.variables, x),
                   jax.jit(model.apply)(variables, x)) <= RTOL


def test_any_batch_size_jit_and_vmap(demonet):
    model, variables, space = demonet
    g = _groups_by_module(space)
    vz = space.zero_groups(variables, [g["conv2"], g["conv8"]])
    sub = ag.construct_subnetwork(space, vz)
    apply, ref = jax.jit(sub.apply), jax.jit(model.apply)
    for b in (1, 7):
        x = jax.random.normal(jax.random.key(b), (b, 28, 28, 1))
        assert rel_err(apply(sub.variables, x), ref(vz, x)) <= RTOL
    x = jax.random.normal(jax.random.key(4), (3, 2, 28, 28, 1))
    batched = jax.jit(jax.vmap(sub.apply, in_axes=(None, 0)))(sub.variables, x)
    assert rel_err(batched, jnp.stack([ref(vz, xi) for xi in x])) <= RTOL


def test_finetuning_lowers_the_loss_and_updates_batch_stats(demonet):
    model, variables, space = demonet
    vz = space.zero_groups(variables, [0, 1, 4])
    sub = ag.construct_subnetwork(space, vz)
    x = jax.random.normal(jax.random.key(5), (8, 28, 28, 1))
    labels = jnp.arange(8) % 10
    tx = optax.adam(1e-3)

    def loss_fn(params, state):
        logits, updates = sub.apply({"params": params, **state}, x, train=True,
                                    mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, updates

    @jax.jit
    def step(params, state, opt_state):
        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state)
        new, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, new), updates, opt_state, loss, grads

    params = sub.variables["params"]
    state = {"batch_stats": sub.variables["batch_stats"]}
    opt_state = tx.init(params)
    losses = []
    for _ in range(5):
        params, state, opt_state, loss, grads = step(params, state, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    # gradients reach every kept parameter, with its (pruned) shape
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    assert all(float(jnp.abs(gr).max()) > 0 for gr in jax.tree_util.tree_leaves(grads))
    old = sub.variables["batch_stats"]["conv6"]["bn"]["mean"]
    assert not np.allclose(state["batch_stats"]["conv6"]["bn"]["mean"], old)
    # the fine-tuned sub-network still runs in inference mode
    tuned = sub.with_variables({"params": params, **state})
    assert np.isfinite(jax.jit(tuned.apply)(tuned.variables, x)).all()


def test_viz_draws_the_sub_network(demonet, tmp_path):
    from asgssd_jax import viz

    _, variables, space = demonet
    sub = ag.construct_subnetwork(space, space.zero_groups(variables, [0, 1, 4]))
    graph = viz.draw_trace_graph(ag.trace(sub.apply, sub.variables, jnp.ones((1, 28, 28, 1))))
    assert "conv6/conv" in graph.source and "conv8" not in graph.source


# ----------------------------------------------------------------------------------------------
# Errors a user can meet


def test_invalid_zero_set_names_the_groups(demonet):
    _, variables, space = demonet
    g = _groups_by_module(space)
    vz = space.zero_groups(variables, [g["conv7"], g["conv8"]])
    with pytest.raises(ag.SurgeryError) as info:
        ag.construct_subnetwork(space, vz)
    msg = str(info.value)
    assert f"g{g['conv7']}" in msg and "params/conv7/conv/kernel" in msg
    assert "params/conv8/conv/kernel" in msg and "is_valid" in msg


def test_variables_that_do_not_match_the_space(demonet):
    _, variables, space = demonet
    with pytest.raises(ag.SurgeryError, match="missing"):
        ag.construct_subnetwork(space, {"params": variables["params"]})
    bad = jax.tree_util.tree_map(lambda a: a, variables)
    bad["params"]["conv6"]["conv"]["kernel"] = jnp.zeros((3, 3, 4, 128))
    with pytest.raises(ag.SurgeryError, match="conv6/conv/kernel"):
        ag.construct_subnetwork(space, bad)


def test_sub_network_rejects_the_full_variables_and_unknown_modes(demonet):
    _, variables, space = demonet
    vz = space.zero_groups(variables, [0])
    sub = ag.construct_subnetwork(space, vz)
    x = jnp.ones((1, 28, 28, 1))
    with pytest.raises(ag.SurgeryError, match="does not have"):
        sub.apply(vz, x)
    with pytest.raises(ag.SurgeryError, match="planned for"):
        sub.apply(sub.variables, x, train=False, extra=1)


# ----------------------------------------------------------------------------------------------
# Hand-made architectures: each rewrite on its own


def _make(nodes, head="gap"):
    module = RandomNet(nodes=nodes, head=head)
    variables = fast_init(module, (6, 6, 3))
    space = ag.generate_search_space(module.apply, variables, jnp.ones((2, 6, 6, 3)),
                                     train=False)
    return module, variables, space


def _group_of(space, module_name):
    (g,) = [gr.index for gr in space.groups if any(f"/{module_name}/" in p
                                                    for p in gr.param_paths)]
    return g


X = jax.random.normal(jax.random.key(7), (3, 6, 6, 3))


@pytest.mark.parametrize("head", ["flatten_bn", "concat_bn_gap", "flatten"])
def test_concat_consumers_through_batchnorm_and_flatten(head):
    nodes = (("conv_bn", (-1,), 3), ("conv_relu", (-1,), 2), ("conv_bn", (-1,), 4),
             ("concat", (0, 1, 2), 9))
    module, variables, space = _make(nodes, head)
    zero = [_group_of(space, "Conv_0")]
    sub, _ = check_exact(module, space, variables, zero, X, train_check=True)
    dense = sub.variables["params"]["Dense_0"]["kernel"]
    full = variables["params"]["Dense_0"]["kernel"]
    assert dense.shape[0] == full.shape[0] * 6 // 9  # 3 of 9 channels gone, flattened or not
    if "bn" in head:
        bn = variables["params"]["BatchNorm_2"]["scale"]
        np.testing.assert_array_equal(sub.variables["params"]["BatchNorm_2"]["scale"], bn[3:])


def test_dead_branch_is_eliminated():
    # Conv_0 feeds only the two convolutions that are removed: it goes too
    nodes = (("conv_bn", (-1,), 2), ("conv_bn", (0,), 3), ("conv_bn", (0,), 3),
             ("add", (1, 2), 3), ("conv_bn", (-1,), 3), ("add", (3, 4), 3))
    module, variables, space = _make(nodes)
    zero = sorted([_group_of(space, "Conv_1"), _group_of(space, "Conv_2")])
    sub, _ = check_exact(module, space, variables, zero, X, train_check=True)
    assert set(sub.variables["params"]) == {"Conv_3", "BatchNorm_3", "Dense_0"}
    t = ag.trace(sub.apply, sub.variables, X)
    assert not any(t.is_joint(v) for v in t.vertices)


def test_chain_of_adds_and_a_subtraction():
    nodes = (("conv_bn", (-1,), 3), ("conv_bn", (-1,), 3), ("conv_bn", (-1,), 3),
             ("add", (0, 1), 3), ("add", (3, 2), 3), ("conv_relu", (4,), 3),
             ("conv_bn", (4,), 3), ("sub", (6, 5), 3))
    module, variables, space = _make(nodes)
    for names in (["Conv_0", "Conv_2"], ["Conv_1"], ["Conv_0", "Conv_1"], ["Conv_4"]):
        zero = sorted(_group_of(space, n) for n in names)
        assert space.is_valid(zero)
        check_exact(module, space, variables, zero, X, train_check=True)
    # removing the first operand of the subtraction leaves -b
    sub, _ = check_exact(module, space, variables, [_group_of(space, "Conv_4")], X)
    prims = [p for v in ag.trace(sub.apply, sub.variables, X).vertices.values()
             for p in v.primitives]
    assert "neg" in prims


def test_removed_sigmoid_branch_leaves_its_constant():
    # sigmoid(conv(x)) with zero kernel and bias is the constant 0.5: folded, conv gone
    nodes = (("conv_bn", (-1,), 3), ("conv_bias_sigmoid", (-1,), 3), ("add", (0, 1), 3),
             ("conv_bias_sigmoid", (-1,), 2), ("concat", (2, 3), 5))
    module, variables, space = _make(nodes, "concat_bn_gap")
    zero = sorted([_group_of(space, "Conv_1"), _group_of(space, "Conv_2")])
    sub, _ = check_exact(module, space, variables, zero, X, train_check=True)
    assert not {"Conv_1", "Conv_2"} & set(sub.variables["params"])
    assert sub.variables["params"]["BatchNorm_1"]["scale"].shape == (3,)


# ----------------------------------------------------------------------------------------------
# Random architectures and the zoo


SETTINGS = settings(max_examples=90, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SETTINGS
@given(random_network(), random_container(), st.randoms(use_true_random=False),
       st.integers(1, 5), st.sampled_from([1, 2]))
def test_random_architectures_are_exact(net, container, rnd, batch, traced_batch):
    """Any architecture, any container of its variables, traced at batch 1 or 2 and run at
    another batch size: the sub-network equals the zeroed network and keeps the container."""
    module, shape = net
    apply_fn, variables = in_container(module, fast_init(module, shape, seed=rnd.randint(0, 2**16)),
                                       container)
    space = ag.generate_search_space(apply_fn, variables, jnp.ones((traced_batch, *shape)),
                                     train=False)
    zero = random_valid_set(space, rnd, at_least=1)
    x = jax.random.normal(jax.random.key(rnd.randint(0, 2**16)), (batch + (batch >= 2), *shape))
    sub, _ = check_exact(module, space, variables, zero, x, apply_fn=apply_fn,
                         train_check=container == "linen" and rnd.random() < 0.25)
    check_container(variables, sub.variables, sub.plan)


def check_container(full, pruned, plan):
    """``pruned`` is ``full``'s kind of tree: removed dict entries gone, removed leaves of
    other nodes None, kept leaves (sliced or not) where they were."""
    assert type(pruned) is type(full)
    kept = set(plan.kept)
    flat = jax.tree_util.tree_flatten_with_path(full)[0]
    if isinstance(full, (tuple, list)):
        assert len(pruned) == len(full)
        for i, x in enumerate(pruned):
            assert (x is None) == (i not in kept)
    elif isinstance(full, dict) and all(not isinstance(v, dict) for v in full.values()):
        assert set(pruned) == {leaf_path(p) for k, (p, _) in enumerate(flat) if k in kept}
    got = [leaf_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(pruned)[0]]
    assert got == [leaf_path(flat[i][0]) for i in plan.kept]


SMALL_ZOO = {
    "stacked_unets": (dict(a_widths=(4, 6, 8, 8), b_widths=(4, 6, 6, 8), features=8), 16),
    "super_resnet": (dict(stages=((8, 1, 4, 1), (12, 2, 4, 1)), stem_width=4, head_width=16), 8),
    "regnet_800m": (dict(widths=(8, 16), depths=(1, 2), group_width=4, strides=(1, 2)), 8),
    "darts_8cells": (dict(C=4, layers=2), 8),
    "densenet121": (dict(growth_rate=4, block_config=(1, 2), num_init_features=8,
                         num_classes=10), 16),
    "mobilenet_v2": (dict(width_multiplier=0.25, blocks=((1, 16, 1, 1), (6, 24, 2, 2)),
                          last_width=32, num_classes=10), 16),
    "resnet18": (dict(stage_sizes=(1, 1), num_filters=4), 8),
    "vit_s16": (dict(patch_size=4, hidden_dim=16, depth=2, num_heads=2, mlp_dim=32,
                     num_classes=10), 8),
}


@pytest.mark.parametrize("name", sorted(SMALL_ZOO))
def test_zoo_networks_are_exact(name):
    import random

    overrides, size = SMALL_ZOO[name]
    module = models.create(name, **overrides)
    shape = (size, size, models.input_shape(name)[-1])
    variables = fast_init(module, shape)
    space = ag.generate_search_space(module.apply, variables, jnp.ones((2, *shape)), train=False)
    x = jax.random.normal(jax.random.key(8), (3, *shape))
    rnd = random.Random(name)
    for trial in range(1 if name.startswith("darts") else 3):  # DARTS: 2,800 operations
        zero = random_valid_set(space, rnd, at_least=1)
        sub, _ = check_exact(module, space, variables, zero, x,
                             train_check=trial == 0 and not name.startswith("darts"))
    # batch size 1 too: some programs differ there (ViT's no-op broadcast of its class token)
    x1 = x[:1]
    assert rel_err(sub.apply(sub.variables, x1),
                   module.apply(space.zero_groups(variables, zero), x1)) <= RTOL


def test_linen_module_without_batch_stats_and_plain_apply_fn():
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            a = nn.Dense(4, name="a")(x)
            b = nn.Dense(4, name="b")(x)
            return nn.Dense(2, name="out")(jnp.concatenate([a, b], -1))

    mlp = MLP()
    x = jax.random.normal(jax.random.key(9), (2, 5))
    variables = mlp.init(jax.random.key(0), x)
    for apply_fn in (mlp.apply, lambda v, x: mlp.apply(v, x)):
        space = ag.generate_search_space(apply_fn, variables, x)
        vz = space.zero_groups(variables, [0])
        sub = ag.construct_subnetwork(space, vz)
        x3 = jax.random.normal(jax.random.key(10), (3, 5))
        assert rel_err(sub.apply(sub.variables, x3), apply_fn(vz, x3)) <= RTOL
        assert sub.variables["params"]["out"]["kernel"].shape == (4, 2)


def test_nnx_module():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Conv(3, 4, (3, 3), rngs=rngs)
            self.b = nnx.Conv(3, 4, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
            self.c = nnx.Conv(8, 5, (3, 3), rngs=rngs)
            self.out = nnx.Linear(5, 2, rngs=rngs)

        def __call__(self, x):
            h = jnp.concatenate([self.a(x), self.b(x)], -1)
            return self.out(nnx.relu(self.c(self.bn(h))).mean((1, 2)))

    net = Net(nnx.Rngs(0))
    net.bn.bias[...] = jnp.linspace(-1.0, 1.0, 8)  # removed channels then carry a constant
    space = ag.generate_search_space(net, None, jnp.ones((2, 6, 6, 3)))
    vz = space.zero_groups(space.variables, [0])
    sub = ag.construct_subnetwork(space, vz)
    assert sub.variables["params"]["c"]["kernel"].shape == (3, 3, 4, 5)
    assert "a" not in sub.variables["params"]
    assert rel_err(sub.apply(sub.variables, X), space.apply_fn(vz, X)) <= RTOL


def test_relative_difference():
    import numpy as np

    from asgssd_jax import relative_difference

    a = {"y": np.array([1.0, -4.0]), "z": np.array([2.0])}
    assert relative_difference(a, a) == 0.0
    assert relative_difference(a, {"y": np.array([1.0, -3.0]), "z": np.array([2.0])}) == \
        pytest.approx(0.25)
    assert relative_difference(a, {"y": np.array([1.0]), "z": np.array([2.0])}) == float("inf")
    assert relative_difference(a, {"y": a["y"]}) == float("inf")
    # a NaN or Inf where the other has a number is no agreement
    assert relative_difference(np.ones(3), np.array([1, np.nan, 1.0])) == float("inf")
    assert relative_difference(np.array([1, np.inf]), np.array([1, 2.0])) == float("inf")
    assert relative_difference(np.array([1, np.nan]), np.array([1, np.nan])) == 0.0
