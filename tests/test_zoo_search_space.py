"""The search space of every zoo network: the removal structures the model-zoo spec predicts.

Variables are abstract (``jax.eval_shape``): generation needs only shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import asgssd_jax as ag
import asgssd_zoo as models

# name, overrides, expected |G_s| (MODEL_ZOO.md)
CASES = [
    ("demonet", {}, 5),
    ("stacked_unets", {}, 6),
    ("resnet18", {}, 8 + 3),  # 8 residual branches + 3 projection shortcuts
    ("resnet50", {}, 16 + 4),
    ("regnet_800m", {}, 16 + 3),
    ("regnet_200m", {}, 13 + 4),
    ("super_resnet", {}, 108 + 36 + 7),  # candidates, post-merge segments, projections
    ("mobilenet_v2", {}, 10),  # inverted residuals with an identity shortcut
    ("ofa_pixel1_143", {}, 15),  # MBConv branches (SE inside) with identity shortcuts
    ("vit_s16", {}, 24),  # 12 attention + 12 MLP residual branches
    ("densenet121", {}, 58),  # every dense layer feeds a growing concat
    ("darts_8cells", {"layers": 3}, 56 + 2 * 64),  # 1 normal + 2 reduction cells
]


@pytest.mark.parametrize("name,overrides,expected", CASES, ids=[c[0] for c in CASES])
def test_zoo_search_space(name, overrides, expected):
    model = models.create(name, **overrides)
    x = jax.ShapeDtypeStruct((1, *models.input_shape(name)), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    space = ag.generate_search_space(model.apply, variables, x, train=False)
    assert space.num_groups == expected, space.summary()
    # removing any single structure keeps the network valid
    assert all(space.is_valid([i]) for i in range(space.num_groups))
    # every structure has parameters and MACs of its own
    assert all(g.num_params > 0 for g in space.groups)
