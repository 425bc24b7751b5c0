"""OFA ``ofa-pixel1-143`` (pixel1_lat@143ms_top1@80.1_finetune@75), a MobileNetV3 (Section 6).

Built from OFA's ``net.config``: a 3x3 stride-2 stem with h-swish, 20 MBConv blocks (ReLU in
the first three stages, h-swish afterwards, squeeze-and-excitation in some), a 1x1 expansion to
1152, global pooling, a 1x1 "feature mix" to 1536 without BN, and the classifier. Convs are
bias-free except the SE convs. 9,221,888 params.

OFA's ``run.config`` feeds 240x240 images (641.8 M MACs); the zoo registers **224x224**
(549.5 M MACs), which is closer to the paper's 511 M. Params do not depend on the size. The
classifier's dropout (0.2 in OFA) is off by default so that training needs no dropout RNG; pass
``dropout_rate=0.2`` (and ``rngs={"dropout": key}``) to enable it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# (out, kernel, stride, mid, activation, se) per MBConv; identity shortcut when in == out, stride 1
PIXEL1_143 = (
    (24, 3, 1, 24, "relu", False),
    (32, 5, 2, 72, "relu", False),
    (32, 3, 1, 192, "relu", False),
    (32, 3, 1, 96, "relu", False),
    (48, 5, 2, 192, "relu", True),
    (48, 5, 1, 288, "relu", True),
    (48, 3, 1, 288, "relu", True),
    (48, 5, 1, 144, "relu", True),
    (96, 7, 2, 288, "h_swish", False),
    (96, 5, 1, 576, "h_swish", False),
    (96, 3, 1, 576, "h_swish", False),
    (96, 3, 1, 384, "h_swish", False),
    (136, 5, 1, 576, "h_swish", True),
    (136, 3, 1, 816, "h_swish", True),
    (136, 5, 1, 816, "h_swish", True),
    (136, 3, 1, 544, "h_swish", True),
    (192, 3, 2, 816, "h_swish", True),
    (192, 3, 1, 1152, "h_swish", True),
    (192, 5, 1, 1152, "h_swish", True),
    (192, 3, 1, 576, "h_swish", True),
)

ACTIVATIONS = {"relu": jax.nn.relu, "h_swish": jax.nn.hard_swish}


def make_divisible(v: float, divisor: int = 8) -> int:
    """Rounds ``v`` to a multiple of ``divisor``, never below 90% of ``v`` (MobileNet rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class SqueezeExcite(nn.Module):
    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = jax.nn.relu(nn.Conv(make_divisible(c // 4), (1, 1), name="reduce")(s))
        s = jax.nn.hard_sigmoid(nn.Conv(c, (1, 1), name="expand")(s))
        return x * s


class MBConv(nn.Module):
    """Inverted bottleneck: [1x1 expand], depthwise KxK, [SE], 1x1 project; Add when shapes match.

    There is no expand conv when ``mid`` equals the input width (expand ratio 1).
    """

    features: int
    kernel: int
    strides: int
    mid: int
    activation: str = "relu"
    se: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        act = ACTIVATIONS[self.activation]

        def bn(y, name):
            return nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)(y)

        y = x
        if self.mid != x.shape[-1]:
            y = act(bn(nn.Conv(self.mid, (1, 1), use_bias=False, name="expand")(y), "expand_bn"))
        y = nn.Conv(self.mid, (self.kernel, self.kernel), strides=self.strides,
                    padding=self.kernel // 2, feature_group_count=self.mid, use_bias=False,
                    name="depthwise")(y)
        y = act(bn(y, "depthwise_bn"))
        if self.se:
            y = SqueezeExcite(name="se")(y)
        y = bn(nn.Conv(self.features, (1, 1), use_bias=False, name="project")(y), "project_bn")
        if self.strides == 1 and x.shape[-1] == self.features:
            y = x + y
        return y


class OFAMobileNetV3(nn.Module):
    num_classes: int = 1000
    blocks: tuple[tuple, ...] = PIXEL1_143
    stem_width: int = 24
    final_expand_width: int = 1152
    feature_mix_width: int = 1536
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        def bn(y, name):
            return nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)(y)

        x = nn.Conv(self.stem_width, (3, 3), strides=2, padding=1, use_bias=False,
                    name="first_conv")(x)
        x = jax.nn.hard_swish(bn(x, "first_bn"))
        for i, cfg in enumerate(self.blocks):
            x = MBConv(*cfg, name=f"block{i}")(x, train)
        x = nn.Conv(self.final_expand_width, (1, 1), use_bias=False, name="final_expand")(x)
        x = jax.nn.hard_swish(bn(x, "final_expand_bn"))
        x = jnp.mean(x, axis=(1, 2))
        # the feature-mix 1x1 conv acts on a 1x1 map, so it is a Dense layer
        x = jax.nn.hard_swish(nn.Dense(self.feature_mix_width, use_bias=False,
                                       name="feature_mix")(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="classifier")(x)


from asgssd_zoo import register  # noqa: E402

register("ofa_pixel1_143", OFAMobileNetV3, input_shape=(224, 224, 3), num_classes=1000,
         dataset="imagenet")
