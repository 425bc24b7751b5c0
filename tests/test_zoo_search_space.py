"""The search space of every zoo network: the removal structures the model-zoo spec predicts,
counted and by content.

Variables are abstract (``jax.eval_shape``): generation needs only shapes.
"""

from __future__ import annotations

import itertools
import re

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



def _paths(prefix: str, spec: str) -> set[str]:
    """``_paths("b/", "bn/{bias,scale} conv/kernel")`` -> {"b/bn/bias", "b/bn/scale",
    "b/conv/kernel"}: one brace alternative per path part."""
    def alternatives(part):
        m = re.fullmatch(r"(.*)\{(.*)\}(.*)", part)
        return [m[1] + a + m[3] for a in m[2].split(",")] if m else [part]

    out = set()
    for word in spec.split():
        parts = [alternatives(p) for p in word.split("/")]
        out |= {prefix + "/".join(c) for c in itertools.product(*parts)}
    return out


_CONV_BN = "{a,b,c}_bn/{bias,scale} {a,b,c}_conv/kernel"
# name -> {group index: its parameter paths (without "params/")}
CONTENTS = {
    "demonet": {0: _paths("conv2/", "conv/kernel bn/{scale,bias}"),
                2: _paths("", "conv{4,5}/conv/kernel conv{4,5}/bn/{scale,bias}")},
    "stacked_unets": {0: _paths("unet_a/", "out_bn/{bias,scale} out_conv/kernel")},
    "resnet18": {0: _paths("stage1_block0/", "conv{1,2}_bn/{bias,scale} conv{1,2}_conv/kernel")},
    "resnet50": {
        0: _paths("stage1_block0/", "conv{1,2,3}_bn/{bias,scale} conv{1,2,3}_conv/kernel"),
        1: _paths("stage1_block0/", "proj_bn/{bias,scale} proj_conv/kernel"),
    },
    "regnet_800m": {0: _paths("stage1_block0/", _CONV_BN),
                    2: _paths("stage2_block0/", "proj_bn/{bias,scale} proj_conv/kernel")},
    "regnet_200m": {1: _paths("stage1_block0/", "proj_bn/{bias,scale} proj_conv/kernel")},
    "super_resnet": {
        0: _paths("stage1_block0/", "proj_bn/{bias,scale} proj_conv/{bias,kernel}"),
        1: _paths("stage1_block0/", "k3_bn/{bias,scale} k3_conv/kernel"),
        2: _paths("stage1_block0/", "k5_bn/{bias,scale} k5_conv/kernel"),
    },
    "mobilenet_v2": {0: _paths("stage2_block1/", "{depthwise,expand,project}_bn/{bias,scale} "
                                                 "{depthwise,expand,project}_conv/kernel")},
    "ofa_pixel1_143": {
        0: _paths("block0/", "{depthwise,project}/kernel {depthwise,project}_bn/{bias,scale}"),
        14: _paths("block19/", "{depthwise,expand,project}/kernel "
                               "{depthwise,expand,project}_bn/{bias,scale} "
                               "se/{expand,reduce}/{bias,kernel}"),
    },
    "vit_s16": {  # attention: its norm and q, k, v, out; MLP: its norm, fc1 and fc2
        0: _paths("block0/", "norm1/{bias,scale} attention/{query,key,value,out}/{bias,kernel}"),
        1: _paths("block0/", "norm2/{bias,scale} mlp/{fc1,fc2}/{bias,kernel}"),
    },
    "densenet121": {0: _paths("block1_layer1/", "conv{1,2}/kernel norm{1,2}/{bias,scale}")},
    "darts_8cells": {
        0: _paths("cell0/edge0_2/sep_conv_3x3/", "sep{1,2}/bn/{bias,scale} "
                                                  "sep{1,2}/{depthwise,pointwise}/kernel"),
        2: _paths("cell0/edge0_2/dil_conv_3x3/", "bn/{bias,scale} {depthwise,pointwise}/kernel"),
    },
}


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
    # each group lies inside one block, and the named groups hold exactly their block's leaves
    groups = [{p.removeprefix("params/") for p in g.param_paths} for g in space.groups]
    if name != "demonet":  # DemoNet's modules are flat: its g3 is conv4 and conv5
        assert all(len({p.split("/")[0] for p in g}) == 1 for g in groups)
    for index, paths in CONTENTS[name].items():
        assert groups[index] == paths, (index, sorted(groups[index]))
    assert not space.excluded
