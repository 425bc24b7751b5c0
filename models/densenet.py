"""DenseNet-121 for ImageNet (torchvision layout, 7,978,856 params).

Each dense layer is BN-ReLU-Conv1x1(bn_size * growth)-BN-ReLU-Conv3x3(growth) and its output is
concatenated onto the running feature map. Transitions are BN-ReLU-Conv1x1 (halving the
channels)-AvgPool 2x2. The stem is a 7x7/2 conv, BN, ReLU and a 3x3/2 max-pool.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class DenseLayer(nn.Module):
    growth_rate: int
    bn_size: int = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        def bn_relu(y, name):
            return jax.nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                            name=name)(y))

        y = nn.Conv(self.bn_size * self.growth_rate, (1, 1), use_bias=False,
                    name="conv1")(bn_relu(x, "norm1"))
        y = nn.Conv(self.growth_rate, (3, 3), padding=1, use_bias=False,
                    name="conv2")(bn_relu(y, "norm2"))
        return jnp.concatenate([x, y], axis=-1)


class Transition(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = jax.nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="norm")(x))
        x = nn.Conv(self.features, (1, 1), use_bias=False, name="conv")(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNet(nn.Module):
    num_classes: int = 1000
    growth_rate: int = 32
    block_config: tuple[int, ...] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4
    compression: float = 0.5

    @nn.compact
    def __call__(self, x, train: bool = False):
        def bn_relu(y, name):
            return jax.nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                            name=name)(y))

        x = nn.Conv(self.num_init_features, (7, 7), strides=2, padding=3, use_bias=False,
                    name="conv0")(x)
        x = nn.max_pool(bn_relu(x, "norm0"), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, n in enumerate(self.block_config):
            for j in range(n):
                x = DenseLayer(self.growth_rate, self.bn_size,
                               name=f"block{i + 1}_layer{j + 1}")(x, train)
            if i != len(self.block_config) - 1:
                x = Transition(int(x.shape[-1] * self.compression),
                               name=f"transition{i + 1}")(x, train)
        x = jnp.mean(bn_relu(x, "norm5"), axis=(1, 2))
        return nn.Dense(self.num_classes, name="classifier")(x)


from asgssd_zoo import register  # noqa: E402

register("densenet121", DenseNet, input_shape=(224, 224, 3), num_classes=1000, dataset="imagenet")
