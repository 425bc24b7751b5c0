"""Saliency proxies for H2SPG's hierarchical search (Section 3.2, "modular proxy").

A saliency function maps :class:`SaliencyInputs` (per-group statistics of one step, plus the
raw trees for custom proxies) to one score per group, ``float[G]``. **Smaller means more
redundant**: the search visits groups by ascending saliency. H2SPG averages the scores
exponentially over the warm-up steps. Every built-in is jittable and O(G) on top of the
statistics, which H2SPG computes in one pass over the grouped leaves.

Write your own as ``fn(inputs: SaliencyInputs) -> jax.Array``; ``inputs.params`` and
``inputs.grads`` are the step's trees, ``inputs.leaf_groups`` says which group owns each
whole leaf (-1 for G_s^C) and ``inputs.leaf_maps`` which groups own the slices of a leaf split
between groups (one layer of a stacked parameter each), e.g. a proxy on the BatchNorm scales
alone::

    def scale_saliency(inputs):
        leaves = jax.tree_util.tree_leaves(inputs.params)
        paths = [jax.tree_util.keystr(p) for p, _ in
                 jax.tree_util.tree_flatten_with_path(inputs.params)[0]]
        sq = sum(m.group_sums(jnp.square(x), len(inputs.param_sq))
                 for x, m, p in zip(leaves, inputs.leaf_maps, paths)
                 if m.grouped and "scale" in p)
        return jnp.sqrt(sq)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from asgssd_jax.search_space import LeafGroupMap

__all__ = [
    "SaliencyFn",
    "SaliencyInputs",
    "cost_aware_saliency",
    "dhspg_saliency",
    "magnitude_saliency",
    "resolve_saliency",
    "taylor_saliency",
]

_TINY = 1e-12


class SaliencyInputs(NamedTuple):
    """What a saliency proxy sees at one warm-up step; arrays are ``float32[G]``.

    Attributes:
      param_sq: ||x_g||^2.
      grad_sq: ||grad_g||^2.
      param_dot_grad: <x_g, grad_g>.
      num_params: number of scalars in each group.
      macs: per-example MACs of each removal structure (``Group.macs``).
      params, grads: the step's trees (as passed to ``update``).
      leaf_groups: group of each leaf of ``params`` in flattening order, -1 for G_s^C and for
        leaves split between groups.
      leaf_maps: a :class:`~asgssd_jax.search_space.LeafGroupMap` per leaf of ``params``:
        which group owns each slice along its ``axis`` (or the whole leaf); its
        ``group_sums(x, G)`` sums any array of the leaf's shape by group.
    """

    param_sq: jax.Array
    grad_sq: jax.Array
    param_dot_grad: jax.Array
    num_params: jax.Array
    macs: jax.Array
    params: Any
    grads: Any
    leaf_groups: tuple[int, ...]
    leaf_maps: tuple[LeafGroupMap, ...] = ()


SaliencyFn = Callable[[SaliencyInputs], jax.Array]


def _normalize(v: jax.Array) -> jax.Array:
    """``v / ||v||_2`` over groups (``torch.nn.functional.normalize`` as DHSPG uses it)."""
    return v / jnp.maximum(jnp.linalg.norm(v), _TINY)


def dhspg_saliency(inputs: SaliencyInputs) -> jax.Array:
    """DHSPG's proxy (the default): cosine similarity and average magnitude, mixed 50/50.

    DHSPG scores redundancy as ``0.5 * normalize(cos(-grad_g, -x_g)) +
    0.5 * normalize(1 / (||x_g|| / |g| + 1e-6))``: a gradient aligned with the group (so the
    projection onto zero follows the descent direction) and a small average magnitude both
    mark a group as redundant. The saliency is its negation, so smaller = more redundant.

    References:
      Chen et al., "OTOv2: Automatic, Generic, User-Friendly", ICLR 2023 (DHSPG).
    """
    cos = inputs.param_dot_grad / jnp.maximum(jnp.sqrt(inputs.param_sq * inputs.grad_sq), _TINY)
    average_magnitude = jnp.sqrt(inputs.param_sq) / jnp.maximum(inputs.num_params, 1.0)
    redundancy = 0.5 * _normalize(cos) + 0.5 * _normalize(1.0 / (average_magnitude + 1e-6))
    return -redundancy


def magnitude_saliency(inputs: SaliencyInputs) -> jax.Array:
    """The group's L2 norm ||x_g||: small groups go first."""
    return jnp.sqrt(inputs.param_sq)


def taylor_saliency(inputs: SaliencyInputs) -> jax.Array:
    """First-order Taylor estimate of the loss change when the group is zeroed, |<grad_g, x_g>|.

    References:
      Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019.
    """
    return jnp.abs(inputs.param_dot_grad)


def cost_aware_saliency(base: SaliencyFn = dhspg_saliency, cost_weight: float = 0.5,
                        cost: str = "macs") -> SaliencyFn:
    """A proxy that favours removing expensive structures (the paper's "hardware" remark).

    Returns ``normalize(base(inputs)) - cost_weight * normalize(cost_g)`` with ``cost_g`` the
    group's MACs (``cost="macs"``) or parameter count (``cost="params"``): among groups of
    similar saliency, the one with more MACs is visited first.

    Args:
      base: the proxy to correct.
      cost_weight: how strongly cost counts, >= 0 (0 gives ``base`` up to a scale).
      cost: ``"macs"`` or ``"params"``.

    Returns:
      A saliency function.
    """
    if cost not in ("macs", "params"):
        raise ValueError(f"cost must be 'macs' or 'params', got {cost!r}")
    if cost_weight < 0:
        raise ValueError(f"cost_weight must be >= 0, got {cost_weight}")

    def saliency(inputs: SaliencyInputs) -> jax.Array:
        c = inputs.macs if cost == "macs" else inputs.num_params
        return _normalize(base(inputs)) - cost_weight * _normalize(c)

    return saliency


_BY_NAME: dict[str, SaliencyFn] = {
    "dhspg": dhspg_saliency,
    "magnitude": magnitude_saliency,
    "taylor": taylor_saliency,
    "cost_aware": cost_aware_saliency(),
}


def resolve_saliency(saliency: SaliencyFn | str | None) -> SaliencyFn:
    """A saliency function from a function, a name (``"dhspg"``, ``"magnitude"``,
    ``"taylor"``, ``"cost_aware"``) or None (the default, ``"dhspg"``)."""
    if saliency is None:
        return dhspg_saliency
    if isinstance(saliency, str):
        try:
            return _BY_NAME[saliency]
        except KeyError:
            raise ValueError(f"unknown saliency {saliency!r}; choose one of "
                             f"{', '.join(sorted(_BY_NAME))} or pass a function") from None
    if not callable(saliency):
        raise TypeError(f"saliency must be a function, a name or None, got {type(saliency)}")
    return saliency
