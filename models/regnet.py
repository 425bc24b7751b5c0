"""RegNetX-200/400/600/800MF adapted to CIFAR-10 (model zoo, Section 4).

Stage widths, depths and group widths are pycls's ``RegNetX-*MF_dds_8gpu`` configs after
quantisation. The CIFAR adaptation (pytorch-cifar style, inferred) uses a 3x3 stride-1 stem with
64 channels, stage strides (1, 1, 2, 2) and a GAP + Linear head. X blocks have bottleneck ratio 1
and no SE; all convs are bias-free.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# widths, depths, group width (pycls RegNetX dds baselines, quantised with q=8)
REGNETX = {
    "200m": ((24, 56, 152, 368), (1, 1, 4, 7), 8),
    "400m": ((32, 64, 160, 384), (1, 2, 7, 12), 16),
    "600m": ((48, 96, 240, 528), (1, 3, 5, 7), 24),
    "800m": ((64, 128, 288, 672), (1, 3, 7, 5), 16),
}


class XBlock(nn.Module):
    """1x1 conv, grouped 3x3 conv (carries the stride), 1x1 conv; Add with the shortcut, ReLU."""

    features: int
    group_width: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        def conv_bn(y, kernel, name, strides=1, groups=1):
            y = nn.Conv(self.features, (kernel, kernel), strides=strides, padding=kernel // 2,
                        feature_group_count=groups, use_bias=False, name=f"{name}_conv")(y)
            return nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"{name}_bn")(y)

        groups = self.features // min(self.group_width, self.features)
        y = jax.nn.relu(conv_bn(x, 1, "a"))
        y = jax.nn.relu(conv_bn(y, 3, "b", self.strides, groups))
        y = conv_bn(y, 1, "c")
        if self.strides != 1 or x.shape[-1] != self.features:
            x = conv_bn(x, 1, "proj", self.strides)
        return jax.nn.relu(x + y)


class RegNet(nn.Module):
    num_classes: int = 10
    widths: tuple[int, ...] = REGNETX["800m"][0]
    depths: tuple[int, ...] = REGNETX["800m"][1]
    group_width: int = REGNETX["800m"][2]
    strides: tuple[int, ...] = (1, 1, 2, 2)
    stem_width: int = 64
    stem_strides: int = 1  # 2 with strides (2, 2, 2, 2) and stem_width 32: the ImageNet layout

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.stem_width, (3, 3), self.stem_strides, padding=1, use_bias=False,
                    name="stem_conv")(x)
        x = jax.nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                     name="stem_bn")(x))
        for i, (width, depth, strides) in enumerate(zip(self.widths, self.depths, self.strides)):
            for j in range(depth):
                x = XBlock(width, self.group_width, strides if j == 0 else 1,
                           name=f"stage{i + 1}_block{j}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="linear")(x)


from asgssd_zoo import register  # noqa: E402

for _flops, (_widths, _depths, _group_width) in REGNETX.items():
    register(f"regnet_{_flops}", RegNet, input_shape=(32, 32, 3), num_classes=10,
             dataset="cifar10", widths=_widths, depths=_depths, group_width=_group_width)
