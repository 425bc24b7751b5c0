"""The model zoo: the paper's super-networks and common general networks.

Every model is a linen Module whose ``__call__(x, train: bool = False)`` takes NHWC images,
except the language model ``decoder_lm``, which takes int32 token ids ``[batch, length]``
(``input_dtype(name)`` tells which).

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
    input_shape: tuple[int, ...]
    num_classes: int
    dataset: str
    input_dtype: str = "float32"
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)


_REGISTRY: dict[str, ModelSpec] = {}


def register(
    name: str,
    factory: Callable[..., nn.Module],
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    dataset: str,
    input_dtype: str = "float32",
    **defaults: Any,
) -> None:
    """Adds a network to the zoo under ``name``; ``defaults`` are constructor fields."""
    _REGISTRY[name] = ModelSpec(name, factory, tuple(input_shape), num_classes, dataset,
                                input_dtype, dict(defaults))


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


def input_shape(name: str) -> tuple[int, ...]:
    """Per-example input shape of the dataset used with ``name``: (H, W, C) for images,
    (length,) for the language model."""
    return spec(name).input_shape


def input_dtype(name: str) -> str:
    """dtype of ``name``'s input: ``"float32"`` for images, ``"int32"`` for token ids."""
    return spec(name).input_dtype


# Importing the families registers them.
from asgssd_zoo import demonet  # noqa: E402,F401

try:  # families added over time; each registers itself on import
    from asgssd_zoo import _families  # noqa: F401
except ImportError:  # pragma: no cover
    pass
