"""SuperResNet on CIFAR-10: ZenNet-2M with K3/K5/K7 candidates (model zoo, Section 3.2, variant A).

The skeleton is ZenNAS's ``zennet_cifar_model_size2M_res32``: a 3x3 stem, seven
SuperResK1KXK1 stages and a 1x1 conv to 512. A stage with ``n`` sub-layers holds ``2n``
bottlenecks; only the first carries the stride and a projection shortcut (1x1 conv with
bias, then BN), even when the shapes already match. In every bottleneck the single KxK conv
of ZenNet is replaced by three parallel candidates Conv3x3-BN, Conv5x5-BN and Conv7x7-BN whose
outputs are summed. Keeping only ZenNet's own kernel in each bottleneck gives ZenNet-2M (1.98 M
params). BN epsilon is 1e-3 as in ZenNAS.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

# (out, stride, bottleneck width, sub-layers) of the SuperResK1KXK1 stages S1-S7.
ZENNET_2M = (
    (120, 1, 40, 1),
    (176, 2, 32, 3),
    (272, 1, 24, 3),
    (176, 1, 56, 3),
    (176, 1, 64, 4),
    (216, 2, 40, 2),
    (72, 2, 56, 2),
)


def _conv_bn(x, features, kernel, train, name, strides=1):
    x = nn.Conv(features, (kernel, kernel), strides=strides, padding=kernel // 2,
                use_bias=False, name=f"{name}_conv")(x)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-3,
                        name=f"{name}_bn")(x)


class Bottleneck(nn.Module):
    """1x1 reduce, summed KxK candidates, 1x1 expand, residual Add and ReLU."""

    features: int
    bottleneck: int
    strides: int = 1
    project: bool = False
    kernels: tuple[int, ...] = (3, 5, 7)

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = jax.nn.relu(_conv_bn(x, self.bottleneck, 1, train, "reduce"))
        candidates = [_conv_bn(y, self.bottleneck, k, train, f"k{k}", self.strides)
                      for k in self.kernels]
        y = jax.nn.relu(sum(candidates[1:], candidates[0]))
        y = _conv_bn(y, self.features, 1, train, "expand")
        if self.project:
            x = nn.Conv(self.features, (1, 1), strides=self.strides, name="proj_conv")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-3,
                             name="proj_bn")(x)
        return jax.nn.relu(x + y)


class SuperResNet(nn.Module):
    num_classes: int = 10
    stages: tuple[tuple[int, int, int, int], ...] = ZENNET_2M
    stem_width: int = 32
    head_width: int = 512
    kernels: tuple[int, ...] = (3, 5, 7)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = jax.nn.relu(_conv_bn(x, self.stem_width, 3, train, "stem"))
        block = functools.partial(Bottleneck, kernels=self.kernels)
        for i, (features, strides, bottleneck, n) in enumerate(self.stages):
            for j in range(2 * n):
                x = block(features, bottleneck, strides if j == 0 else 1, project=j == 0,
                          name=f"stage{i + 1}_block{j}")(x, train)
        x = jax.nn.relu(_conv_bn(x, self.head_width, 1, train, "head"))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="linear")(x)


from asgssd_zoo import register  # noqa: E402

register("super_resnet", SuperResNet, input_shape=(32, 32, 3), num_classes=10, dataset="cifar10")
