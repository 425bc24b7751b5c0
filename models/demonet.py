"""DemoNet: the paper's small but complex example network (Figure 2a).

Layout from the model-zoo specification: Conv1-BN1 feeds three branches (Conv2-BN2;
MaxPool-Conv3-BN3; AvgPool-Conv4-BN4-ReLU-Conv5-BN5) joined by a Concat, then Conv6-BN6
(stride 2) feeds Conv7-BN7 and AvgPool-Conv8-BN8 joined by an Add, then two linear layers.
Its removal structures are g2, g3, g45, g7 and g8.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


class ConvBN(nn.Module):
    """3x3 convolution without bias followed by BatchNorm."""

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.features, (3, 3), strides=self.strides, padding="SAME", use_bias=False,
                    name="conv")(x)
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)


def _pool3(pool, x):
    return pool(x, (3, 3), strides=(1, 1), padding="SAME")


class DemoNet(nn.Module):
    num_classes: int = 10
    width: int = 1  # width multiplier, for quick tests

    @nn.compact
    def __call__(self, x, train: bool = False):
        w = self.width
        block = functools.partial(ConvBN)
        x = jax.nn.relu(block(64 * w, name="conv1")(x, train))
        g2 = block(32 * w, name="conv2")(x, train)
        g3 = block(32 * w, name="conv3")(_pool3(nn.max_pool, x), train)
        avg = nn.avg_pool(x, (3, 3), strides=(1, 1), padding="SAME", count_include_pad=False)
        g45 = jax.nn.relu(block(32 * w, name="conv4")(avg, train))
        g45 = block(64 * w, name="conv5")(g45, train)
        x = jnp.concatenate([g2, g3, g45], axis=-1)
        x = jax.nn.relu(block(128 * w, strides=2, name="conv6")(x, train))
        g7 = block(256 * w, name="conv7")(x, train)
        avg2 = nn.avg_pool(x, (3, 3), strides=(1, 1), padding="SAME", count_include_pad=False)
        g8 = block(256 * w, name="conv8")(avg2, train)
        x = jax.nn.relu(g7 + g8)
        x = jnp.mean(x, axis=(1, 2))
        x = jax.nn.relu(nn.Dense(128 * w, name="linear1")(x))
        return nn.Dense(self.num_classes, name="linear2")(x)


from asgssd_zoo import register  # noqa: E402

register("demonet", DemoNet, input_shape=(28, 28, 1), num_classes=10, dataset="fashion_mnist")
