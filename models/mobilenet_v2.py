"""MobileNetV2 for ImageNet (torchvision layout, width 1.0: 3,504,872 params).

Inverted residual blocks (1x1 expand, 3x3 depthwise, linear 1x1 project, ReLU6) with an
identity Add when stride is 1 and widths match. Widths are scaled by ``width_multiplier`` and
rounded with ``make_divisible``. The classifier's dropout (0.2 in torchvision) is off by
default so that training needs no dropout RNG; pass ``dropout_rate=0.2`` to enable it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from asgssd_zoo.ofa import make_divisible

# expand ratio t, width c, repeats n, first stride s
INVERTED_RESIDUALS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _conv_bn(x, features, kernel, train, name, strides=1, groups=1):
    x = nn.Conv(features, (kernel, kernel), strides=strides, padding=kernel // 2,
                feature_group_count=groups, use_bias=False, name=f"{name}_conv")(x)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"{name}_bn")(x)


class InvertedResidual(nn.Module):
    features: int
    strides: int
    expand_ratio: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        hidden = x.shape[-1] * self.expand_ratio
        y = x
        if self.expand_ratio != 1:
            y = jax.nn.relu6(_conv_bn(y, hidden, 1, train, "expand"))
        y = jax.nn.relu6(_conv_bn(y, hidden, 3, train, "depthwise", self.strides, hidden))
        y = _conv_bn(y, self.features, 1, train, "project")
        if self.strides == 1 and x.shape[-1] == self.features:
            y = x + y
        return y


class MobileNetV2(nn.Module):
    num_classes: int = 1000
    width_multiplier: float = 1.0
    blocks: tuple[tuple[int, int, int, int], ...] = INVERTED_RESIDUALS
    stem_width: int = 32
    last_width: int = 1280
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        m = self.width_multiplier
        x = jax.nn.relu6(_conv_bn(x, make_divisible(self.stem_width * m), 3, train, "stem", 2))
        for i, (t, c, n, s) in enumerate(self.blocks):
            for j in range(n):
                x = InvertedResidual(make_divisible(c * m), s if j == 0 else 1, t,
                                     name=f"stage{i + 1}_block{j}")(x, train)
        last = make_divisible(self.last_width * max(1.0, m))
        x = jax.nn.relu6(_conv_bn(x, last, 1, train, "last"))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="classifier")(x)


from asgssd_zoo import register  # noqa: E402

register("mobilenet_v2", MobileNetV2, input_shape=(224, 224, 3), num_classes=1000,
         dataset="imagenet")
