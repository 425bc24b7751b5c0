"""StackedUnets: two U-Nets side by side on SVHN (model zoo, Section 2).

Topology from OTO's trace graph: both U-Nets read the image, every skip merge is an Add,
up-sampling is a parameter-free nearest-neighbour resize x2, and the two outputs are added,
global-average-pooled and classified by one Linear layer. U-Net A down-samples by max-pooling,
U-Net B by stride-2 convolutions. All convs are 3x3 without bias. The widths are the spec's
fitted proposal; the Adds force A.L1/A.L2/A.L3 to end in ``a1``, A.D1 in ``a0`` (same in B),
and both outputs in ``features``.

Removal structures (6): A.L3, A.D1, A.OUT, B.L3, B.D1, B.OUT: each feeds only an Add.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

Conv = functools.partial(nn.Conv, kernel_size=(3, 3), padding=1, use_bias=False)


def _bn(train: bool, name: str):
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)


def _up(x):
    """Nearest-neighbour up-sampling x2 (ONNX Resize in the trace)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _pool(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2))


class UNetA(nn.Module):
    """U-Net that down-samples with 2x2 max-pooling (trace nodes 0-38)."""

    a0: int = 48
    a1: int = 64
    a2: int = 128
    a3: int = 128
    features: int = 128

    @nn.compact
    def __call__(self, x, train: bool = False):
        relu = jax.nn.relu
        s0 = Conv(self.a0, name="l0_conv1")(x)
        s0 = Conv(self.a0, name="l0_conv2")(relu(_bn(train, "l0_bn")(s0)))
        s1 = relu(Conv(self.a1, name="l1_conv1")(_pool(s0)))
        s1 = _bn(train, "l1_bn")(relu(Conv(self.a1, name="l1_conv2")(s1)))
        s2 = Conv(self.a2, name="l2_conv1")(_pool(s1))
        s2 = Conv(self.a1, name="l2_conv2")(s2)
        r1 = Conv(self.a3, name="l3_conv1")(_pool(s2))  # removal structure R1
        r1 = _up(Conv(self.a1, name="l3_conv2")(r1))
        y = _up(s2 + r1) + s1
        y = Conv(self.a1, name="d1_conv1")(y)  # R2
        y = _up(relu(_bn(train, "d1_bn")(Conv(self.a0, name="d1_conv2")(y))))
        y = relu(y + s0)  # R3 starts at this ReLU
        return _bn(train, "out_bn")(relu(Conv(self.features, name="out_conv")(y)))


class UNetB(nn.Module):
    """U-Net that down-samples with stride-2 3x3 convs (trace nodes 39-75)."""

    b0: int = 16
    b1: int = 64
    b2: int = 64
    b3: int = 64
    features: int = 128

    @nn.compact
    def __call__(self, x, train: bool = False):
        relu = jax.nn.relu
        t0 = relu(_bn(train, "l0_bn")(Conv(self.b0, name="l0_conv")(x)))
        t1 = Conv(self.b1, strides=2, name="l1_conv1")(t0)
        t1 = relu(Conv(self.b1, name="l1_conv2")(t1))
        t2 = relu(Conv(self.b2, strides=2, name="l2_conv1")(t1))
        t2 = Conv(self.b2, name="l2_conv2")(_bn(train, "l2_bn")(t2))
        t2 = Conv(self.b1, name="l2_conv3")(t2)
        r4 = Conv(self.b3, strides=2, name="l3_conv1")(t2)  # removal structure R4
        r4 = Conv(self.b3, name="l3_conv2")(r4)
        r4 = _up(Conv(self.b1, name="l3_conv3")(r4))
        y = _up(t2 + r4) + t1
        y = Conv(self.b1, name="d1_conv1")(y)  # R5
        y = _up(relu(_bn(train, "d1_bn")(Conv(self.b0, name="d1_conv2")(y))))
        y = relu(y + t0)  # R6 starts at this ReLU
        return _bn(train, "out_bn")(relu(Conv(self.features, name="out_conv")(y)))


class StackedUnets(nn.Module):
    num_classes: int = 10
    a_widths: tuple[int, int, int, int] = (48, 64, 128, 128)
    b_widths: tuple[int, int, int, int] = (16, 64, 64, 64)
    features: int = 128

    @nn.compact
    def __call__(self, x, train: bool = False):
        a = UNetA(*self.a_widths, features=self.features, name="unet_a")(x, train)
        b = UNetB(*self.b_widths, features=self.features, name="unet_b")(x, train)
        x = jnp.mean(a + b, axis=(1, 2))
        return nn.Dense(self.num_classes, name="linear")(x)


from asgssd_zoo import register  # noqa: E402

register("stacked_unets", StackedUnets, input_shape=(32, 32, 3), num_classes=10, dataset="svhn")
