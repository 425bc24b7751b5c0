"""The model zoo: the paper's super-networks and common general networks.

Every model is a linen Module whose ``__call__(x, train: bool = False)`` takes NHWC images.

    >>> import asgssd_zoo as models
    >>> net = models.create("demonet")
    >>> models.input_shape("demonet")
    (28, 28, 1)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build one zoo network and what it is fed."""

    name: str
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, int, int]
    num_classes: int
    dataset: str
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)


_REGISTRY: dict[str, ModelSpec] = {}


def register(
    name: str,
    factory: Callable[..., nn.Module],
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    dataset: str,
    **defaults: Any,
) -> None:
    """Adds a network to the zoo under ``name``."""
    _REGISTRY[name] = ModelSpec(name, factory, input_shape, num_classes, dataset, dict(defaults))


def names() -> list[str]:
    """Names of every registered network, sorted."""
    return sorted(_REGISTRY)


def spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown model {name!r}; choose one of: {', '.join(names())}"
        ) from None


def create(name: str, **overrides: Any) -> nn.Module:
    """Builds the zoo network ``name``; ``overrides`` replace its constructor fields."""
    s = spec(name)
    kwargs = {"num_classes": s.num_classes, **s.defaults, **overrides}
    return s.factory(**kwargs)


def input_shape(name: str) -> tuple[int, int, int]:
    """Per-example input shape (H, W, C) of the dataset the paper used with ``name``."""
    return spec(name).input_shape


# Importing the families registers them.
from asgssd_zoo import demonet  # noqa: E402,F401

try:  # families added over time; each registers itself on import
    from asgssd_zoo import _families  # noqa: F401
except ImportError:  # pragma: no cover
    pass
