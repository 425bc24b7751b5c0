"""PyTorch twins of the zoo's ResNet-18 (CIFAR stem) and DenseNet-121, for benchmarks/peers.py.

Same layers, same parameter counts and, by design, the same module names as the Flax
definitions in ``models/resnet.py`` and ``models/densenet.py`` (``stage1_block0.conv1_conv``
here is ``params["stage1_block0"]["conv1_conv"]`` there), so that :func:`load_flax_variables`
can copy a Flax model's variables into its twin and the two compute the same function.
BatchNorm: Flax's ``momentum=0.9`` is PyTorch's ``momentum=0.1``; both use ``eps=1e-5``.

Needs the ``bench`` extra (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _bn(features: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(features, eps=1e-5, momentum=0.1)


def _add_conv_bn(owner: nn.Module, name: str, cin: int, cout: int, kernel: int, stride=1):
    """A bias-free conv and its BN, registered on ``owner`` as ``{name}_conv`` and
    ``{name}_bn`` (the names the Flax definition's ``_conv_bn`` gives them)."""
    owner.add_module(f"{name}_conv", nn.Conv2d(cin, cout, kernel, stride, kernel // 2,
                                               bias=False))
    owner.add_module(f"{name}_bn", _bn(cout))


def _conv_bn(owner: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    return getattr(owner, f"{name}_bn")(getattr(owner, f"{name}_conv")(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, features: int, stride: int = 1):
        super().__init__()
        _add_conv_bn(self, "conv1", cin, features, 3, stride)
        _add_conv_bn(self, "conv2", features, features, 3)
        self.has_proj = stride != 1 or cin != features
        if self.has_proj:
            _add_conv_bn(self, "proj", cin, features, 1, stride)

    def forward(self, x):
        y = F.relu(_conv_bn(self, "conv1", x))
        y = _conv_bn(self, "conv2", y)
        shortcut = _conv_bn(self, "proj", x) if self.has_proj else x
        return F.relu(shortcut + y)


class ResNet18(nn.Module):
    """``models.create("resnet18")``: CIFAR stem (3x3/1 conv), stages of 2 BasicBlocks,
    11,173,962 parameters."""

    def __init__(self, num_classes: int = 10, stage_sizes=(2, 2, 2, 2), num_filters: int = 64):
        super().__init__()
        _add_conv_bn(self, "stem", 3, num_filters, 3)
        cin = num_filters
        self.block_names = []
        for i, depth in enumerate(stage_sizes):
            for j in range(depth):
                features = num_filters * 2**i
                name = f"stage{i + 1}_block{j}"
                self.add_module(name, BasicBlock(cin, features, 2 if i > 0 and j == 0 else 1))
                self.block_names.append(name)
                cin = features
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.relu(_conv_bn(self, "stem", x))
        for name in self.block_names:
            x = getattr(self, name)(x)
        return self.linear(x.mean(dim=(2, 3)))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth_rate: int, bn_size: int = 4):
        super().__init__()
        self.norm1 = _bn(cin)
        self.conv1 = nn.Conv2d(cin, bn_size * growth_rate, 1, bias=False)
        self.norm2 = _bn(bn_size * growth_rate)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv1(F.relu(self.norm1(x)))
        y = self.conv2(F.relu(self.norm2(y)))
        return torch.cat([x, y], dim=1)


class Transition(nn.Module):
    def __init__(self, cin: int, features: int):
        super().__init__()
        self.norm = _bn(cin)
        self.conv = nn.Conv2d(cin, features, 1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv(F.relu(self.norm(x))), 2, 2)


class DenseNet121(nn.Module):
    """``models.create("densenet121")`` (torchvision's layout), 7,978,856 parameters."""

    def __init__(self, num_classes: int = 1000, growth_rate: int = 32,
                 block_config=(6, 12, 24, 16), num_init_features: int = 64, bn_size: int = 4,
                 compression: float = 0.5):
        super().__init__()
        self.conv0 = nn.Conv2d(3, num_init_features, 7, 2, 3, bias=False)
        self.norm0 = _bn(num_init_features)
        self.body = []
        c = num_init_features
        for i, n in enumerate(block_config):
            for j in range(n):
                name = f"block{i + 1}_layer{j + 1}"
                self.add_module(name, DenseLayer(c, growth_rate, bn_size))
                self.body.append(name)
                c += growth_rate
            if i != len(block_config) - 1:
                name = f"transition{i + 1}"
                self.add_module(name, Transition(c, int(c * compression)))
                self.body.append(name)
                c = int(c * compression)
        self.norm5 = _bn(c)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.norm0(self.conv0(x))), 3, 2, 1)
        for name in self.body:
            x = getattr(self, name)(x)
        return self.classifier(F.relu(self.norm5(x)).mean(dim=(2, 3)))


MODELS = {"resnet18": ResNet18, "densenet121": DenseNet121}


def create(name: str) -> nn.Module:
    """The PyTorch twin of the zoo network ``name`` (``resnet18`` or ``densenet121``)."""
    return MODELS[name]()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


_RENAME = {"kernel": "weight", "scale": "weight", "bias": "bias",
           "mean": "running_mean", "var": "running_var"}


def _flatten(tree: Mapping, prefix: str = ""):
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield prefix, k, v


def load_flax_variables(model: nn.Module, variables: Mapping) -> None:
    """Copies a Flax twin's ``{"params", "batch_stats"}`` into ``model`` (in place).

    Conv kernels go from HWIO to OIHW, Dense kernels from (in, out) to (out, in). Every
    parameter and BN statistic of ``model`` must be matched exactly once.
    """
    state = model.state_dict()
    todo = {k for k in state if not k.endswith("num_batches_tracked")}
    for collection in ("params", "batch_stats"):
        for prefix, leaf, value in _flatten(variables[collection]):
            key = prefix + _RENAME[leaf]
            a = np.asarray(value)
            if leaf == "kernel":
                a = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
            if tuple(state[key].shape) != a.shape:
                raise ValueError(f"{key}: torch {tuple(state[key].shape)} vs flax {a.shape}")
            state[key] = torch.from_numpy(np.array(a, order="C"))  # a writable copy
            todo.remove(key)
    if todo:
        raise ValueError(f"not set from the Flax variables: {sorted(todo)}")
    model.load_state_dict(state)
