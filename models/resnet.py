"""ResNet-18 for CIFAR-10 and ResNet-50 for ImageNet (torchvision layouts).

Convs are bias-free and followed by BN; a stage's first block carries the stride (on the 3x3 conv
of a bottleneck, as in torchvision's ResNet v1.5) and a 1x1 conv-BN projection when the shape
changes. ``cifar_stem`` swaps the 7x7/2 conv and max-pool for a 3x3/1 conv (pytorch-cifar).
ResNet-18 (CIFAR) has 11,173,962 params, ResNet-50 25,557,032.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def _conv_bn(x, features, kernel, train, name, strides=1):
    x = nn.Conv(features, (kernel, kernel), strides=strides, padding=kernel // 2,
                use_bias=False, name=f"{name}_conv")(x)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"{name}_bn")(x)


def _shortcut(x, features, strides, train):
    if strides != 1 or x.shape[-1] != features:
        return _conv_bn(x, features, 1, train, "proj", strides)
    return x


class BasicBlock(nn.Module):
    features: int
    strides: int = 1
    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = jax.nn.relu(_conv_bn(x, self.features, 3, train, "conv1", self.strides))
        y = _conv_bn(y, self.features, 3, train, "conv2")
        return jax.nn.relu(_shortcut(x, self.features, self.strides, train) + y)


class Bottleneck(nn.Module):
    features: int
    strides: int = 1
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        out = self.features * self.expansion
        y = jax.nn.relu(_conv_bn(x, self.features, 1, train, "conv1"))
        y = jax.nn.relu(_conv_bn(y, self.features, 3, train, "conv2", self.strides))
        y = _conv_bn(y, out, 1, train, "conv3")
        return jax.nn.relu(_shortcut(x, out, self.strides, train) + y)


class ResNet(nn.Module):
    num_classes: int = 1000
    stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
    block_cls: type[nn.Module] = Bottleneck
    num_filters: int = 64
    cifar_stem: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.cifar_stem:
            x = jax.nn.relu(_conv_bn(x, self.num_filters, 3, train, "stem"))
        else:
            x = jax.nn.relu(_conv_bn(x, self.num_filters, 7, train, "stem", strides=2))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, depth in enumerate(self.stage_sizes):
            for j in range(depth):
                strides = 2 if i > 0 and j == 0 else 1
                x = self.block_cls(self.num_filters * 2**i, strides,
                                   name=f"stage{i + 1}_block{j}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="linear")(x)


from asgssd_zoo import register  # noqa: E402

register("resnet18", ResNet, input_shape=(32, 32, 3), num_classes=10, dataset="cifar10",
         stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock, cifar_stem=True)
register("resnet50", ResNet, input_shape=(224, 224, 3), num_classes=1000, dataset="imagenet",
         stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
