"""Baselines of the paper's ablation (Table 4), with :func:`~asgssd_jax.optim.h2spg.h2spg`'s
interface and state, so that one training script runs all three.

* :func:`dhspg`: DHSPG without the hierarchy: G_r is simply the K groups of smallest
  saliency, with no validity check, so at high sparsity it can cut every input-output path
  (the table's "X" cells).
* :func:`proxsg_plus`: ProxSG+: H2SPG's hierarchical search, but proximal group-lasso steps
  instead of half-space projections on G_r.
"""

from __future__ import annotations

from typing import Any

import optax

from asgssd_jax.optim.h2spg import hybrid_sparse_optimizer
from asgssd_jax.optim.saliency import SaliencyFn

__all__ = ["dhspg", "proxsg_plus"]


def dhspg(
    space: Any,
    learning_rate: optax.ScalarOrSchedule,
    target_group_sparsity: float,
    *,
    warmup_steps: int,
    projection_steps: int,
    base: str | optax.GradientTransformation = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    epsilon: optax.ScalarOrSchedule = 0.0,
    group_lasso: optax.ScalarOrSchedule | None = None,
    lasso_amplify: float = 1.1,
    lasso_max_factor: float = 10.0,
    fade_out: bool = False,
    nonfinite: str = "skip",
    saliency: SaliencyFn | str | None = None,
    saliency_decay: float = 0.9,
) -> optax.GradientTransformation:
    """DHSPG without hierarchy: H2SPG with the search replaced by top-K saliency.

    Exactly K = ``int(target_group_sparsity * space.num_groups)`` groups are zeroed from
    ``warmup_steps + projection_steps`` on, whether or not the network stays valid (check
    with ``space.is_valid``). Arguments, phases and state are those of
    :func:`~asgssd_jax.optim.h2spg.h2spg`.

    References:
      Chen, Liang, Ding, Zhu, Zharkov, "OTOv2: Automatic, Generic, User-Friendly", ICLR 2023.
    """
    return hybrid_sparse_optimizer(
        space, learning_rate, target_group_sparsity, warmup_steps=warmup_steps,
        projection_steps=projection_steps, base=base, momentum=momentum,
        weight_decay=weight_decay, epsilon=epsilon, group_lasso=group_lasso,
        lasso_amplify=lasso_amplify, lasso_max_factor=lasso_max_factor, fade_out=fade_out,
        nonfinite=nonfinite, saliency=saliency, saliency_decay=saliency_decay, search="top_k",
        redundant_step="half_space", name="dhspg")


def proxsg_plus(
    space: Any,
    learning_rate: optax.ScalarOrSchedule,
    target_group_sparsity: float,
    *,
    warmup_steps: int,
    projection_steps: int,
    base: str | optax.GradientTransformation = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    group_lasso: optax.ScalarOrSchedule | None = 1e-3,
    fade_out: bool = False,
    nonfinite: str = "skip",
    saliency: SaliencyFn | str | None = None,
    saliency_decay: float = 0.9,
    host_search: bool = True,
) -> optax.GradientTransformation:
    r"""ProxSG+: the hierarchical search of H2SPG with proximal group-lasso steps.

    Each redundant group takes :math:`y_g = x_g + u_g` (``u`` the base update) followed by the
    group soft-threshold :math:`y_g \max(0, 1 - \mu/\|y_g\|)`, :math:`\mu` = learning rate
    :math:`\times` ``group_lasso`` (None: per group, as :func:`~asgssd_jax.optim.h2spg.h2spg`'s
    default; ``fade_out=True``: :math:`\|y_g\|/r`, r the projection steps left); the last
    projection step zeroes what remains. Arguments, phases and state are those of
    :func:`~asgssd_jax.optim.h2spg.h2spg`.

    References:
      Deleu, Bengio, "Structured Sparsity Inducing Adaptive Optimizers for Deep Learning",
      arXiv:2102.03869, 2021.
    """
    return hybrid_sparse_optimizer(
        space, learning_rate, target_group_sparsity, warmup_steps=warmup_steps,
        projection_steps=projection_steps, base=base, momentum=momentum,
        weight_decay=weight_decay, epsilon=0.0, group_lasso=group_lasso, lasso_amplify=1.0,
        lasso_max_factor=1.0, fade_out=fade_out, nonfinite=nonfinite, saliency=saliency,
        saliency_decay=saliency_decay,
        search="hierarchical", redundant_step="proximal", name="proxsg_plus",
        host_search=host_search)
