"""DARTS super-networks without architecture weights (model zoo, Section 5).

Every cell has 4 nodes; node ``i`` sums all 8 candidate primitives on each of its ``i + 2``
incoming edges (14 edges per cell) and the cell output concatenates the 4 nodes. There are no
alphas, as in OTO's super-net: each node is one multi-input Add. Reduction cells sit at
``layers // 3`` and ``2 * layers // 3``, double ``C`` and apply stride 2 on the edges leaving
the two cell inputs. All convs are bias-free and padded symmetrically as in PyTorch.

The pools are followed by a non-affine BN (no params) as in DARTS's ``MixedOp``; ``affine``
sets whether the other op BNs (preprocess, sep/dil convs, FactorizedReduce) have a scale and
bias. With ``affine=True`` (the registered default) DARTS-8 has 4,083,058 params; with
``affine=False`` (DARTS's search default) 3,998,194. The paper's 4.05 M lies between.

* ``darts_8cells``: DARTS's search network (C=24, 8 cells, 3x3 stem to 3C) for STL-10. The input
  is registered as **32x32x3**, not STL-10's native 96x96: the paper's 614 M FLOPs are only
  reachable at 32x32 (600 M exact, 621 M with OTO's dilation-blind counter).
* ``darts_14cells``: DARTS's ``NetworkImageNet`` skeleton (C=48, 14 cells, three stride-2 stem
  convs) at 224x224 with all-ops cells, 25,532,896 params. The training-only auxiliary head is
  left out.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

PRIMITIVES = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
              "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")


def _sum(xs):
    return sum(xs[1:], xs[0])


class FactorizedReduce(nn.Module):
    """ReLU, two stride-2 1x1 convs (the second on the input shifted by one pixel), Concat, BN."""

    features: int
    affine: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = jax.nn.relu(x)
        a = nn.Conv(self.features // 2, (1, 1), strides=2, use_bias=False, name="conv1")(x)
        b = nn.Conv(self.features // 2, (1, 1), strides=2, use_bias=False,
                    name="conv2")(x[:, 1:, 1:])
        x = jnp.concatenate([a, b], axis=-1)
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, use_scale=self.affine,
                            use_bias=self.affine, name="bn")(x)


class ReLUConvBN(nn.Module):
    features: int
    affine: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.features, (1, 1), use_bias=False, name="conv")(jax.nn.relu(x))
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, use_scale=self.affine,
                            use_bias=self.affine, name="bn")(x)


class DilConv(nn.Module):
    """ReLU, depthwise KxK (dilation ``dilation``), pointwise 1x1, BN."""

    features: int
    kernel: int
    strides: int = 1
    dilation: int = 1
    affine: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        k, d = self.kernel, self.dilation
        x = nn.Conv(x.shape[-1], (k, k), strides=self.strides, padding=d * (k - 1) // 2,
                    kernel_dilation=d, feature_group_count=x.shape[-1], use_bias=False,
                    name="depthwise")(jax.nn.relu(x))
        x = nn.Conv(self.features, (1, 1), use_bias=False, name="pointwise")(x)
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, use_scale=self.affine,
                            use_bias=self.affine, name="bn")(x)


class SepConv(nn.Module):
    """Two stacked DilConvs with dilation 1; only the first carries the stride."""

    features: int
    kernel: int
    strides: int = 1
    affine: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = DilConv(self.features, self.kernel, self.strides, affine=self.affine,
                    name="sep1")(x, train)
        return DilConv(self.features, self.kernel, affine=self.affine, name="sep2")(x, train)


class MixedOp(nn.Module):
    """The 8 DARTS primitives on one edge; returns their outputs (summed by the node)."""

    features: int
    strides: int = 1
    affine: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        s, c, affine = self.strides, self.features, self.affine
        pad = ((1, 1), (1, 1))

        def pool_bn(y, name):  # DARTS: pool then BatchNorm(affine=False)
            return nn.BatchNorm(use_running_average=not train, momentum=0.9, use_scale=False,
                                use_bias=False, name=name)(y)

        return [
            x[:, ::s, ::s] * 0.0,  # none
            pool_bn(nn.max_pool(x, (3, 3), (s, s), pad), "max_pool_3x3"),
            pool_bn(nn.avg_pool(x, (3, 3), (s, s), pad, count_include_pad=False), "avg_pool_3x3"),
            x if s == 1 else FactorizedReduce(c, affine, name="skip_connect")(x, train),
            SepConv(c, 3, s, affine, name="sep_conv_3x3")(x, train),
            SepConv(c, 5, s, affine, name="sep_conv_5x5")(x, train),
            DilConv(c, 3, s, 2, affine, name="dil_conv_3x3")(x, train),
            DilConv(c, 5, s, 2, affine, name="dil_conv_5x5")(x, train),
        ]


class Cell(nn.Module):
    features: int
    reduction: bool = False
    reduction_prev: bool = False
    steps: int = 4
    affine: bool = True

    @nn.compact
    def __call__(self, s0, s1, train: bool = False):
        c, affine = self.features, self.affine
        if self.reduction_prev:
            s0 = FactorizedReduce(c, affine, name="preprocess0")(s0, train)
        else:
            s0 = ReLUConvBN(c, affine, name="preprocess0")(s0, train)
        states = [s0, ReLUConvBN(c, affine, name="preprocess1")(s1, train)]
        for i in range(self.steps):
            ops = []
            for j, h in enumerate(states):
                strides = 2 if self.reduction and j < 2 else 1
                ops += MixedOp(c, strides, affine, name=f"edge{j}_{i + 2}")(h, train)
            states.append(_sum(ops))
        return jnp.concatenate(states[2:], axis=-1)


class DARTSNetwork(nn.Module):
    num_classes: int = 10
    C: int = 24
    layers: int = 8
    steps: int = 4
    stem_multiplier: int = 3
    imagenet_stem: bool = False
    affine: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        C = self.C

        def conv_bn(y, features, strides, name):
            y = nn.Conv(features, (3, 3), strides=strides, padding=1, use_bias=False,
                        name=f"{name}_conv")(y)
            return nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"{name}_bn")(y)

        if self.imagenet_stem:
            s0 = conv_bn(jax.nn.relu(conv_bn(x, C // 2, 2, "stem0a")), C, 2, "stem0b")
            s1 = conv_bn(jax.nn.relu(s0), C, 2, "stem1")
        else:
            s0 = s1 = conv_bn(x, self.stem_multiplier * C, 1, "stem")
        reduction_prev = self.imagenet_stem
        for i in range(self.layers):
            reduction = i in (self.layers // 3, 2 * self.layers // 3)
            C = 2 * C if reduction else C
            cell = Cell(C, reduction, reduction_prev, self.steps, self.affine, name=f"cell{i}")
            s0, s1 = s1, cell(s0, s1, train)
            reduction_prev = reduction
        x = jnp.mean(s1, axis=(1, 2))
        return nn.Dense(self.num_classes, name="classifier")(x)


from asgssd_zoo import register  # noqa: E402

register("darts_8cells", DARTSNetwork, input_shape=(32, 32, 3), num_classes=10, dataset="stl10",
         C=24, layers=8)
register("darts_14cells", DARTSNetwork, input_shape=(224, 224, 3), num_classes=1000,
         dataset="imagenet", C=48, layers=14, imagenet_stem=True)
