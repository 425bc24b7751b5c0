"""The model zoo: exact parameter counts of the registered networks (MODEL_ZOO.md) and
forward passes of small variants of each family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models.ofa import PIXEL1_143

# MODEL_ZOO.md: trainable tensors only (BN scale and bias count, running statistics do not).
EXPECTED_PARAMS = {
    "demonet": 847_498,
    "stacked_unets": 835_786,
    "super_resnet": 7_764_530,
    "regnet_200m": 2_321_946,
    "regnet_400m": 4_779_338,
    "regnet_600m": 5_676_330,
    "regnet_800m": 6_594_186,
    "darts_8cells": 4_083_058,
    "darts_14cells": 25_532_896,
    "ofa_pixel1_143": 9_221_888,
    "resnet18": 11_173_962,
    "resnet50": 25_557_032,
    "densenet121": 7_978_856,
    "mobilenet_v2": 3_504_872,
    "vit_s16": 22_050_664,
}

# name -> (overrides giving a small network of the same family, input H = W)
SMALL = {
    "demonet": ({}, 28),
    "stacked_unets": (dict(a_widths=(4, 6, 8, 8), b_widths=(4, 6, 6, 8), features=8), 16),
    "super_resnet": (dict(stages=((8, 1, 4, 1), (12, 2, 4, 1)), stem_width=4, head_width=16), 8),
    "regnet_800m": (dict(widths=(8, 16), depths=(1, 2), group_width=4, strides=(1, 2)), 8),
    "darts_8cells": (dict(C=4, layers=3), 8),
    "darts_14cells": (dict(C=4, layers=3, num_classes=10), 32),
    "ofa_pixel1_143": (dict(blocks=(PIXEL1_143[0], (16, 5, 2, 24, "h_swish", True),
                                    (16, 3, 1, 32, "h_swish", True)),
                            stem_width=24, final_expand_width=32, feature_mix_width=32,
                            num_classes=10), 16),
    "resnet18": (dict(stage_sizes=(1, 1), num_filters=4), 8),
    "resnet50": (dict(stage_sizes=(1, 1), num_filters=4, num_classes=10), 32),
    "densenet121": (dict(growth_rate=4, block_config=(1, 2), num_init_features=8,
                         num_classes=10), 32),
    "mobilenet_v2": (dict(width_multiplier=0.25, blocks=((1, 16, 1, 1), (6, 24, 2, 2)),
                          last_width=32, num_classes=10), 32),
    "vit_s16": (dict(patch_size=4, hidden_dim=16, depth=2, num_heads=2, mlp_dim=32,
                     num_classes=10), 8),
}


def count_params(variables):
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(variables["params"]))


def test_every_model_is_covered():
    assert set(models.names()) == set(EXPECTED_PARAMS)


@pytest.mark.parametrize("name", models.names())
def test_param_count(name):
    model = models.create(name)
    x = jnp.zeros((1, *models.input_shape(name)))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert count_params(variables) == EXPECTED_PARAMS[name]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_forward(name):
    overrides, size = SMALL[name]
    model = models.create(name, **overrides)
    channels = models.input_shape(name)[-1]
    x = jax.random.normal(jax.random.key(1), (2, size, size, channels))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    num_classes = overrides.get("num_classes", models.spec(name).num_classes)
    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))

    y = apply(variables, x, train=False)
    assert y.shape == (2, num_classes)
    assert np.isfinite(y).all()

    y_train, updates = apply(variables, x, train=True, mutable=("batch_stats",))
    assert y_train.shape == (2, num_classes)
    assert np.isfinite(y_train).all()
    if "batch_stats" in variables:
        old, new = variables["batch_stats"], updates["batch_stats"]
        assert jax.tree_util.tree_structure(old) == jax.tree_util.tree_structure(new)
        assert any(not np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(old),
                                                         jax.tree_util.tree_leaves(new)))
