"""H2SPG, the hierarchical half-space projected gradient (Algorithm 3), as an optax transformation.

Phases, counted in updates (``state.count``):

* warm-up, ``count < warmup_steps``: the base optimizer updates every leaf; each group's
  saliency is averaged exponentially.
* hierarchical search, at ``count == warmup_steps``, once: groups visited by ascending
  saliency join the redundant set G_r while the network stays valid and |G_r| < K
  (:func:`~asgssd_jax.optim.search.hierarchical_search`, run on the host through one
  callback so that the train step does not compile it).
* hybrid, from ``warmup_steps`` on: G_r^C follows the base optimizer unchanged. During the
  ``projection_steps`` steps that start at the search, each redundant group takes the base step
  plus a group-lasso push towards zero and is projected onto exactly zero when the half-space
  test says so; the last projection step zeroes whatever remains. From
  ``warmup_steps + projection_steps`` on, exactly K groups (those of G_r) are zero and stay so.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from asgssd_jax.optim.saliency import SaliencyFn, SaliencyInputs, resolve_saliency
from asgssd_jax.optim.search import (
    SearchGraph,
    hierarchical_search,
    hierarchical_search_callback,
    top_k_search,
)
from asgssd_jax.search_space import LeafGroupMap

__all__ = [
    "H2SPGInfo",
    "H2SPGState",
    "SparsityWarning",
    "h2spg",
    "h2spg_info",
    "search_graph",
]


class SparsityWarning(UserWarning):
    """The target group sparsity cannot be met exactly; fewer groups will be zeroed."""


class H2SPGState(NamedTuple):
    """State of :func:`h2spg` (and of the baselines built on it).

    Attributes:
      count: updates done so far (a skipped non-finite step does not count), ``int32``.
      saliency: exponential average of each group's saliency over warm-up, ``float32[G]``.
      redundant: G_r, set once by the search at ``count == warmup_steps``, ``bool[G]``.
      zero: groups projected onto zero so far (they stay zero), ``bool[G]``.
      search_norm: ``||x_g||`` at the search, for the redundant groups, ``float32[G]``.
      lasso: each redundant group's group-lasso coefficient set at the search (the default
        ``group_lasso=None``), ``float32[G]``.
      zero_step: the update (value of ``count``) that projected each group onto zero, -1 for
        none, ``int32[G]``.
      zeroed_by_test: whether the half-space test (True) or the last projection step's
        safeguard (False) zeroed each group, ``bool[G]``.
      zero_norm: ``||x_g||`` just before its projection relative to ``search_norm``,
        ``float32[G]`` (0 for groups not zeroed).
      notfinite_count: updates skipped because a gradient or update was not finite, ``int32``.
      base_state: the base optimizer's state.
    """

    count: jax.Array
    saliency: jax.Array
    redundant: jax.Array
    zero: jax.Array
    search_norm: jax.Array
    lasso: jax.Array
    zero_step: jax.Array
    zeroed_by_test: jax.Array
    zero_norm: jax.Array
    notfinite_count: jax.Array
    base_state: optax.OptState


class H2SPGInfo(NamedTuple):
    """What :func:`h2spg_info` reads from a state (arrays; index groups with ``np.flatnonzero``).

    Attributes:
      step: updates done so far.
      saliency: per-group saliency averaged over warm-up (smaller = more redundant).
      redundant: the redundant groups G_r (all False before the search).
      zero_groups: groups the optimizer has projected onto zero.
      zero_step: per group, the update (0-based) that projected it onto zero; -1 for none.
      zeroed_by_test: per group, True where the half-space test zeroed it, False where the
        last projection step's safeguard did (or it is not zero).
      zero_relative_norm: per group, its norm just before the projection relative to its norm
        at the search (0 for groups not zeroed).
      skipped_steps: updates skipped because of non-finite gradients or updates.
    """

    step: jax.Array
    saliency: jax.Array
    redundant: jax.Array
    zero_groups: jax.Array
    zero_step: jax.Array
    zeroed_by_test: jax.Array
    zero_relative_norm: jax.Array
    skipped_steps: jax.Array


def h2spg_info(state: optax.OptState) -> H2SPGInfo:
    """Reads the H2SPG state inside ``state`` (which may be a chain, ``inject_hyperparams`` or
    ``apply_if_finite`` state holding one, or an ``nnx.Optimizer``'s ``opt_state``). Works
    inside ``jit``.

    Example::

        info = h2spg_info(opt_state)
        np.flatnonzero(info.redundant)   # indices of G_r
        np.flatnonzero(info.zero_groups & ~info.zeroed_by_test)   # left to the safeguard
    """
    found = [s for s in jax.tree_util.tree_leaves(
        state, is_leaf=lambda s: isinstance(s, H2SPGState)) if isinstance(s, H2SPGState)]
    if len(found) != 1:
        raise ValueError(f"expected one H2SPGState in the optimizer state, found {len(found)}")
    (s,) = found
    # nnx.Optimizer keeps its state's arrays in OptArray variables.
    s = H2SPGState(*(_unwrap_variable(x) for x in s))
    return H2SPGInfo(step=s.count, saliency=s.saliency, redundant=s.redundant, zero_groups=s.zero,
                     zero_step=s.zero_step, zeroed_by_test=s.zeroed_by_test & s.zero,
                     zero_relative_norm=s.zero_norm, skipped_steps=s.notfinite_count)


def _unwrap_variable(x: Any) -> Any:
    from flax import nnx

    return x.get_value() if isinstance(x, nnx.Variable) else x


# --------------------------------------------------------------------------------------------
# Construction helpers.

_SEARCH_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def search_graph(space: Any) -> SearchGraph:
    """The static search arrays of ``space`` (built once per space and cached)."""
    try:
        return _SEARCH_GRAPHS[space]
    except KeyError:
        graph = _SEARCH_GRAPHS[space] = SearchGraph.from_space(space)
        return graph


def _concrete(x: Any) -> float | None:
    """``x`` as a Python number, or None when it is traced (e.g. under inject_hyperparams)."""
    try:
        return float(x)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def _schedule(x: optax.ScalarOrSchedule) -> Callable[[jax.Array], jax.Array]:
    return x if callable(x) else (lambda count: x)


def _is_python_zero(x: Any) -> bool:
    # Decided on the Python value only: under inject_hyperparams the same argument arrives as
    # an array, concrete in init and traced in update, and both must build the same chain.
    return isinstance(x, (int, float)) and x == 0


def _base_optimizer(base, learning_rate, momentum, weight_decay) -> optax.GradientTransformation:
    if isinstance(base, optax.GradientTransformation):
        return base
    coupled = [] if _is_python_zero(weight_decay) else [optax.add_decayed_weights(weight_decay)]
    if base == "sgd":
        m = None if _is_python_zero(momentum) else momentum
        return optax.chain(*coupled, optax.sgd(learning_rate, momentum=m))
    if base == "adam":
        return optax.chain(*coupled, optax.adam(learning_rate))
    if base == "adamw":
        return optax.adamw(learning_rate, weight_decay=weight_decay)
    raise ValueError(f"base must be 'sgd', 'adam', 'adamw' or an optax GradientTransformation, "
                     f"got {base!r}")


def _target_count(space, target_group_sparsity, cap: bool, name: str):
    """K, capped at what can be removed validly when ``cap``; warns at construction."""
    num_groups = space.num_groups
    t = _concrete(target_group_sparsity)
    if t is None:  # a traced hyperparameter: K in float32, no checks possible
        return jnp.floor(target_group_sparsity * num_groups).astype(jnp.int32)
    if not 0.0 <= t < 1.0 or math.isnan(t):
        raise ValueError(f"{name}: target_group_sparsity must be in [0, 1), got {t}")
    k = int(t * num_groups)
    if num_groups == 0 and t > 0:
        warnings.warn(
            f"{name}: the search space has no removal structures (cond, while and scans over "
            "data alone are opaque, shared weights and candidates that fail zero-invariance are "
            "excluded: "
            "see space.summary()), so nothing will be removed and the network trains with the "
            "base optimizer alone", SparsityWarning, stacklevel=3)
    if cap:
        most = search_graph(space).max_removable
        if k > most:
            warnings.warn(
                f"{name}: target_group_sparsity={t} asks for K={k} of {num_groups} groups, but "
                f"at most {most} can be removed while every output keeps reading every input it "
                f"depends on; {most} groups will be zeroed",
                SparsityWarning, stacklevel=3)
            k = most
    return k


def _check_steps(warmup_steps, projection_steps, name: str) -> None:
    for arg, value, least in (("warmup_steps", warmup_steps, 1),
                              ("projection_steps", projection_steps, 1)):
        v = _concrete(value)
        if v is None:
            continue
        if v != int(v) or v < least:
            raise ValueError(f"{name}: {arg} must be an integer >= {least}, got {value}")


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How a params tree maps onto the search space (computed at trace time)."""

    maps: tuple[LeafGroupMap, ...]  # which groups own the entries of each leaf
    leaf_groups: tuple[int, ...]  # group owning each whole leaf, -1 for G_s^C and split leaves
    whole: tuple[int, ...]  # indices of leaves one group owns whole
    split: tuple[int, ...]  # indices of leaves split between groups (slices along an axis)
    # the whole leaves in runs reduced together: many of one shape and dtype as one stack
    # (_STACK_AT or more), the others one by one
    runs: tuple[tuple[int, ...], ...]


def _layout(space, params, name: str) -> _Layout:
    try:
        maps = tuple(space.leaf_group_maps(params))
    except ValueError as e:
        raise ValueError(f"{name}: the params tree does not match the search space: {e}") from None
    leaves = jax.tree_util.tree_leaves(params)
    owners: dict[int, list[tuple[int, ...]]] = {}
    for x, m in zip(leaves, maps):
        for g in np.unique(m.ids[m.ids >= 0]):
            owners.setdefault(int(g), []).append(tuple(np.shape(x)))
        if m.axis is not None and (m.axis >= np.ndim(x) or np.shape(x)[m.axis] != len(m.ids)):
            raise ValueError(
                f"{name}: the params tree does not match the search space: a leaf of shape "
                f"{np.shape(x)} is split into {len(m.ids)} slices along axis {m.axis}; pass "
                "variables['params'] of the model the space was generated from")
    program = space.trace.program
    for gr in space.groups:
        want = sorted(tuple(program.shape(program.leaf_vars[i])) for i in gr.leaves)
        got = sorted(owners.get(gr.index, []))
        if want != got:
            raise ValueError(
                f"{name}: the params tree does not match the search space: group {gr.index} "
                f"({', '.join(gr.param_paths)}) expects leaves of shapes {want}, the tree has "
                f"{got}; pass variables['params'] of the model the space was generated from")
    gids = tuple(m.whole if m.axis is None else -1 for m in maps)
    whole = tuple(i for i, g in enumerate(gids) if g >= 0)
    split = tuple(i for i, m in enumerate(maps) if m.axis is not None and m.grouped)
    by_kind: dict[tuple, list[int]] = {}
    for i in whole:
        by_kind.setdefault((np.shape(leaves[i]), str(leaves[i].dtype)), []).append(i)
    runs = tuple(run for kind in by_kind.values()
                 for run in ([tuple(kind)] if len(kind) >= _STACK_AT else [(i,) for i in kind]))
    return _Layout(maps, gids, whole, split, runs)


# Leaves of one shape and dtype, at least this many, are stacked and reduced together: with
# many leaves (DARTS cells) the program is then far smaller and compiles faster; with fewer,
# a reduction per leaf compiles faster than the stacking.
_STACK_AT = 32


def _add4(a, b):
    return tuple(p + q for p, q in zip(a, b))


def _reduce4(x: jax.Array, b: jax.Array, u: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``float32[4, ...]``: <x, x>, <x, b>, <b, b> and the sum of ``u`` over ``axes``, as one
    variadic reduction (one kernel per shape; three ``jnp.sum`` would compile three)."""
    x, b, u = x.astype(jnp.float32), b.astype(jnp.float32), u.astype(jnp.float32)
    zero = jnp.zeros([], jnp.float32)
    return jnp.stack(jax.lax.reduce((x * x, x * b, b * b, u), (zero,) * 4, _add4, axes))


def _group_stats(layout: _Layout, num_groups: int, xs: list, bs: list, us: list
                 ) -> tuple[jax.Array, jax.Array]:
    """Each group's <x, x>, <x, b>, <b, b> over its entries (``float32[3, G]``), and one number
    that is finite only if every ``b`` of a grouped leaf and every update ``u`` is finite.

    One pass over every leaf: the statistics and the finiteness check share one reduction
    per leaf, and XLA compiles the identical reductions of leaves of one shape once, so the
    step compiles one kernel per leaf shape for both; many leaves of one shape are stacked
    and reduced together. A split leaf (a stacked layer parameter) is reduced once for all
    its slices, then summed by its slices' groups.
    """
    parts, checks = [], []
    for i in layout.split:
        m = layout.maps[i]
        other = tuple(a for a in range(xs[i].ndim) if a != m.axis)
        per = _reduce4(xs[i], bs[i], us[i], other)  # [4, slices]
        parts.append(m.slice_sums(per[:3], num_groups))
        checks.append(jnp.sum(per[2:]))
    grouped = set(layout.split) | set(layout.whole)
    for i, u in enumerate(us):  # G_s^C's leaves: the update alone
        if i not in grouped and jnp.issubdtype(jnp.result_type(u), jnp.inexact):
            checks.append(jnp.sum(u, dtype=jnp.float32))
    if layout.whole:
        sums = []
        for run in layout.runs:
            x, b, u = (jnp.stack([a[i] for i in run]) for a in (xs, bs, us))  # [len(run), ...]
            sums.append(_reduce4(x, b, u, tuple(range(1, x.ndim))))
        per = jnp.concatenate(sums, axis=1)  # [4, leaves]
        checks.append(jnp.sum(per[2:]))
        gids = np.array([layout.leaf_groups[i] for run in layout.runs for i in run], np.int32)
        if per.shape[1] * num_groups <= 1 << 16:  # small: a dense sum beats a scatter
            one_hot = np.eye(num_groups, dtype=np.float32)[gids]
            parts.append(jnp.dot(per[:3], one_hot, precision=jax.lax.Precision.HIGHEST))
        else:
            parts.append(jax.vmap(lambda v: jax.ops.segment_sum(v, gids, num_groups))(per[:3]))
    stats = (functools.reduce(jnp.add, parts) if parts
             else jnp.zeros((3, num_groups), jnp.float32))
    check = functools.reduce(jnp.add, checks) if checks else jnp.zeros([], jnp.float32)
    return stats, check


def _as_buffers(always: jax.Array, values: Any) -> Any:
    """``values`` (a tree of small arrays), returned by a conditional as plain buffers.

    A value computed from others (the per-group coefficients) or a constant (a group's index
    into them) is fused into every consumer, so every leaf's kernel would recompute it and
    differ from the kernels of the other leaves. Values that leave a conditional are buffers:
    the kernels of leaves of one shape are then identical, and XLA compiles identical kernels
    once (compile time grows with the number of leaf shapes, not of leaves or groups).
    ``always`` is a predicate that is always true but unknown to the compiler.
    """
    return jax.lax.cond(always, lambda: values,
                        lambda: jax.tree_util.tree_map(jnp.zeros_like, values))


# --------------------------------------------------------------------------------------------
# The transformation.


# The default group-lasso coefficient: over the projection phase, the push alone would move
# each redundant group by this many times its norm at the search, so that the half-space test
# zeroes it about half-way through the phase, at a small fraction of that norm.
_PUSH_OVER_PHASE = 2.0

_NONFINITE = ("skip", "raise")


def _raise_nonfinite(name: str, count) -> None:
    raise FloatingPointError(
        f"{name}: non-finite gradient or update at update {int(count)}; the step was not "
        f"applied (pass nonfinite='skip' to skip such steps instead)")


def _window_lr_sum(learning_rate, start, steps) -> jax.Array:
    """The sum of the learning rate over updates ``start .. start + steps - 1``."""
    if not callable(learning_rate):
        return jnp.asarray(steps, jnp.float32) * jnp.asarray(learning_rate, jnp.float32)
    return jax.lax.fori_loop(
        0, steps, lambda i, acc: acc + jnp.asarray(learning_rate(start + i), jnp.float32),
        jnp.zeros([], jnp.float32))


def hybrid_sparse_optimizer(
    space: Any,
    learning_rate: optax.ScalarOrSchedule,
    target_group_sparsity: float,
    *,
    warmup_steps: int,
    projection_steps: int,
    base: str | optax.GradientTransformation,
    momentum: float,
    weight_decay: float,
    epsilon: optax.ScalarOrSchedule,
    group_lasso: optax.ScalarOrSchedule | None,
    lasso_amplify: float,
    lasso_max_factor: float,
    fade_out: bool,
    nonfinite: str,
    saliency: SaliencyFn | str | None,
    saliency_decay: float,
    search: str,
    redundant_step: str,
    name: str,
    host_search: bool = True,
) -> optax.GradientTransformation:
    """The machinery shared by :func:`h2spg` and the baselines (see their docstrings).

    ``search`` is ``"hierarchical"`` (Algorithm 3) or ``"top_k"`` (no validity check);
    ``redundant_step`` is ``"half_space"`` (HSPG/DHSPG) or ``"proximal"`` (ProxSG).
    """
    num_groups = space.num_groups
    _check_steps(warmup_steps, projection_steps, name)
    k = _target_count(space, target_group_sparsity, cap=search == "hierarchical", name=name)
    d = _concrete(saliency_decay)
    if d is not None and not 0.0 <= d < 1.0:
        raise ValueError(f"{name}: saliency_decay must be in [0, 1), got {saliency_decay}")
    if nonfinite not in _NONFINITE:
        raise ValueError(f"{name}: nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
    for flag, value in (("fade_out", fade_out), ("host_search", host_search)):
        if not isinstance(value, bool):
            raise ValueError(f"{name}: {flag} must be True or False, got {value!r}")
    base_tx = _base_optimizer(base, learning_rate, momentum, weight_decay)
    saliency_fn = resolve_saliency(saliency)
    auto_lasso = group_lasso is None
    lr, lam, eps = _schedule(learning_rate), _schedule(group_lasso), _schedule(epsilon)
    if search == "hierarchical":
        graph = search_graph(space)
        run = hierarchical_search_callback if host_search else hierarchical_search
        search_fn = lambda s: run(graph, s, k)  # noqa: E731
    else:
        search_fn = lambda s: top_k_search(num_groups, s, k)  # noqa: E731
    num_params = np.array([g.num_params for g in space.groups], np.float32)
    macs = np.array([g.macs for g in space.groups], np.float32)

    def init_fn(params):
        _layout(space, params, name)
        zeros_f = jnp.zeros(num_groups, jnp.float32)
        return H2SPGState(
            count=jnp.zeros([], jnp.int32),
            saliency=zeros_f,
            redundant=jnp.zeros(num_groups, bool),
            zero=jnp.zeros(num_groups, bool),
            search_norm=zeros_f,
            lasso=zeros_f,
            zero_step=jnp.full(num_groups, -1, jnp.int32),
            zeroed_by_test=jnp.zeros(num_groups, bool),
            zero_norm=zeros_f,
            notfinite_count=jnp.zeros([], jnp.int32),
            base_state=base_tx.init(params),
        )

    def update_fn(grads, state, params=None):
        if params is None:
            raise ValueError(f"{name} needs the parameters: call update(grads, state, params)")
        layout = _layout(space, params, name)
        xs, treedef = jax.tree_util.tree_flatten(params)
        try:
            gs = treedef.flatten_up_to(grads)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{name}: grads and params have different structures: {e}") from None
        count = state.count
        updates, base_state = base_tx.update(grads, state.base_state, params)
        us = treedef.flatten_up_to(updates)
        warm, proj = warmup_steps, projection_steps

        # Per-group statistics, one pass over the leaves for every phase: <x, x>, <x, b>,
        # <b, b> with b the gradient in warm-up (for the saliency) and the base update after
        # (for the redundant groups' trial step); the same pass checks that the step is finite.
        in_warmup = count < warm
        is_search = count == warm
        in_proj = (count >= warm) & (count < warm + proj)
        bs = [jnp.where(in_warmup, g.astype(u.dtype), u) if g.shape == u.shape else u
              for g, u in zip(gs, us)]
        stats, check = _group_stats(layout, num_groups, xs, bs, us)
        # A step with a non-finite gradient or update changes nothing but the count of such
        # steps: every new value below is selected against the old one by ``finite``.
        finite = jnp.isfinite(check)
        if nonfinite == "raise":
            jax.lax.cond(finite, lambda: None,
                         lambda: jax.debug.callback(
                             functools.partial(_raise_nonfinite, name), state.count))

        # Warm-up: exponential average of the saliency.
        def sample():
            param_sq, param_dot_grad, grad_sq = stats
            inputs = SaliencyInputs(
                param_sq=param_sq, grad_sq=grad_sq, param_dot_grad=param_dot_grad,
                num_params=jnp.asarray(num_params), macs=jnp.asarray(macs),
                params=params, grads=grads, leaf_groups=layout.leaf_groups,
                leaf_maps=layout.maps)
            s = jnp.asarray(saliency_fn(inputs), jnp.float32)
            if s.shape != (num_groups,):
                raise ValueError(f"{name}: the saliency function returned shape {s.shape}, "
                                 f"expected ({num_groups},)")
            return s

        s = jax.lax.cond(in_warmup, sample, lambda: state.saliency)
        blended = jnp.where(count == 0, s, saliency_decay * state.saliency
                            + (1.0 - saliency_decay) * s)
        # A non-finite sample (e.g. 0/0 in a custom proxy) is left out of the average.
        avg = jnp.where(in_warmup & jnp.isfinite(s), blended, state.saliency)

        # The one-time search (on the host, through one callback, for hierarchical search).
        redundant = jax.lax.cond(is_search, lambda: search_fn(avg), lambda: state.redundant)

        # Hybrid phase: the redundant groups' trial step.
        active = redundant & ~state.zero & in_proj
        xx, xu, uu = (jnp.where(active, v, 0.0) for v in stats)
        nx = jnp.sqrt(xx)
        safe_nx = jnp.where(nx > 0, nx, 1.0)
        final = count == warm + proj - 1
        search_norm = jnp.where(is_search & redundant, nx, state.search_norm)
        if auto_lasso and not fade_out:
            # lambda_g such that lr * lambda_g summed over the phase is _PUSH_OVER_PHASE times
            # the group's norm at the search: a group-lasso weight per group.
            lasso = jax.lax.cond(
                is_search,
                lambda: _PUSH_OVER_PHASE * search_norm
                / jnp.maximum(_window_lr_sum(learning_rate, warm, proj), 1e-30),
                lambda: state.lasso)
        else:
            lasso = state.lasso

        if fade_out:
            # OTO's HESSO-style scheduled fade-out: shrink by 1/r of the norm per step, r the
            # projection steps left, so the last projection step removes what is left.
            remaining = jnp.maximum(warm + proj - count, 1).astype(jnp.float32)
            mu0 = (nx if redundant_step == "half_space" else 1.0) / remaining
        else:
            coef = lasso if auto_lasso else jnp.asarray(lam(count), jnp.float32)
            mu0 = jnp.asarray(lr(count), jnp.float32) * coef
        if redundant_step == "half_space":
            if fade_out:  # and cancel whatever growth the base step gives the group
                mu = mu0 + jnp.maximum(xu, 0.0) / safe_nx
            else:
                # DHSPG's adaptive group lasso: where the base step grows the group
                # (<x, u> > 0), strengthen the push so that it wins (up to lasso_max_factor
                # times), preferring a push that keeps -u + push a descent direction. Unlike
                # DHSPG, whose coefficient is small, the push never falls below mu0: the
                # default mu0 is sized to zero the group within the phase.
                low = xu / safe_nx
                high = uu * nx / jnp.where(xu > 0, xu, 1.0)
                mu = jnp.clip(lasso_amplify * low, mu0, mu0 * lasso_max_factor)
                mu = jnp.maximum(jnp.where(mu >= high, 0.5 * (low + high), mu), mu0)
                mu = jnp.where(xu > 0, mu, mu0)
            # Half-space test on x_trial = x + u - mu x/||x||: <x_trial, x> < eps ||x||^2.
            trial_dot_x = xx + xu - mu * nx
            test = (trial_dot_x < eps(count) * xx) | (xx == 0)
            shrink = jnp.where(nx > 0, mu / safe_nx, 0.0)
            keep_u = jnp.ones_like(shrink)
        else:
            # Proximal group lasso on y = x + u: y (1 - mu/||y||)_+.
            ny = jnp.sqrt(jnp.maximum(xx + 2.0 * xu + uu, 0.0))
            if fade_out:
                mu0 = ny * mu0
            test = ny <= mu0
            shrink = jnp.where(ny > 0, mu0 / jnp.where(ny > 0, ny, 1.0), 0.0)
            keep_u = 1.0 - shrink

        project = active & (test | final) & finite
        push = active & ~project
        zero = state.zero | project

        # Each group's update is a_g u + c_g x: (1, 0) for the base step, (keep, -shrink) for
        # the push, (0, -1) for a zero group (exactly -x, so that params + updates is exactly
        # 0); a non-finite step's update is 0. The [G, 2] coefficients and each group's index
        # into them reach the leaves' kernels as buffers (see _as_buffers), so that the
        # kernels of leaves of one shape are identical whatever their group.
        coef = jnp.stack([jnp.where(zero, 0.0, jnp.where(push, keep_u, 1.0)),
                          jnp.where(zero, -1.0, jnp.where(push, -shrink, 0.0))], axis=1)
        whole_groups = sorted({layout.leaf_groups[i] for i in layout.whole})
        coef, index, ok = _as_buffers(count >= 0, (
            coef, {g: jnp.int32(g) for g in whole_groups}, finite))

        def place(x, u, cu, cx):
            return jnp.where(ok, cu.astype(u.dtype) * u + cx.astype(u.dtype) * x,
                             jnp.zeros([], u.dtype))

        out = [jnp.where(ok, u, jnp.zeros([], u.dtype)) for u in us]
        for i in layout.whole:
            c = jax.lax.dynamic_index_in_dim(coef, index[layout.leaf_groups[i]], 0, False)
            out[i] = place(xs[i], us[i], c[0], c[1])
        fills = (1.0, 0.0)  # G_s^C's entries of a split leaf
        for i in layout.split:  # per-slice values, broadcast along the split axis
            m, ndim = layout.maps[i], xs[i].ndim
            out[i] = place(xs[i], us[i], *(m.take(coef[:, j], f, ndim)
                                           for j, f in enumerate(fills)))

        def kept(new, old):
            return jnp.where(finite, new, old)

        new_state = H2SPGState(
            count=kept(optax.safe_increment(count), count),
            saliency=kept(avg, state.saliency),
            redundant=kept(redundant, state.redundant),
            zero=zero,
            search_norm=kept(search_norm, state.search_norm),
            lasso=kept(lasso, state.lasso),
            zero_step=jnp.where(project, count, state.zero_step),
            zeroed_by_test=state.zeroed_by_test | (project & test & ~final),
            zero_norm=jnp.where(project, nx / jnp.where(search_norm > 0, search_norm, 1.0),
                                state.zero_norm),
            notfinite_count=state.notfinite_count + (~finite).astype(jnp.int32),
            # A conditional, not a select per leaf: it compiles to copies, no kernels.
            base_state=jax.lax.cond(finite, lambda: base_state, lambda: state.base_state),
        )
        return jax.tree_util.tree_unflatten(treedef, out), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def h2spg(
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
    host_search: bool = True,
) -> optax.GradientTransformation:
    r"""Hierarchical Half-Space Projected Gradient (H2SPG, Algorithm 3).

    Trains a network and finds K = ``int(target_group_sparsity * space.num_groups)`` removal
    structures to drop while keeping the network valid: from update number
    ``warmup_steps + projection_steps`` on, exactly K groups of ``space`` are exactly zero, the
    set is valid (``space.is_valid``) and the zero groups stay zero. If no valid set of K
    groups exists, the largest possible number is zeroed and a :class:`SparsityWarning` is
    issued here. Read the redundant set, zero groups and saliencies with :func:`h2spg_info`.

    Phases (``count`` = updates done): warm-up while ``count < warmup_steps`` (base optimizer
    everywhere, saliency averaged); at ``count == warmup_steps`` the hierarchical
    search picks G_r; during the ``projection_steps`` updates that start with it, each
    not-yet-zero group of G_r takes HSPG's half-space step: the trial point
    :math:`\tilde x_g = x_g + u_g - \mu_g x_g/\|x_g\|` (``u`` the base optimizer's update,
    :math:`\mu_g` = learning rate :math:`\times\lambda_g`, the group-lasso coefficient adapted
    as in DHSPG) is accepted, or the group is projected onto exactly zero when the half-space
    test :math:`\langle\tilde x_g, x_g\rangle < \epsilon\|x_g\|^2` says so. With the default
    coefficient the test zeroes the groups during the phase, at a small fraction of their norm
    at the search; the last projection step zeroes whatever is left, as a safeguard.
    :func:`h2spg_info` tells, per group, the update that zeroed it, whether the test or the
    safeguard did, and its norm then relative to its norm at the search. Entries outside G_r
    always get the base optimizer's update unchanged. A group may own whole leaves or slices
    of leaves (one layer of a stacked or scanned parameter): its statistics and its update
    cover exactly its entries.

    Updates follow optax's convention (``optax.apply_updates``); a projected group's update is
    exactly ``-params``, so h2spg must be the last transformation of a chain (clipping etc.
    go before it). Its update is jittable and runs under ``jit``, ``pmap`` and sharded
    parameters; the search runs once, at update ``warmup_steps``, in a few milliseconds, on
    the host through one ``jax.pure_callback`` (compiled for the host's CPU the first time it
    runs); no other update touches the host.

    With ``optax.inject_hyperparams(h2spg)(space, ...)`` the numeric arguments become
    (float32) hyperparameters; name a custom ``saliency`` function in ``static_args`` (it is
    not a schedule), and note that K is then ``floor(target_group_sparsity * G)`` in float32.

    Non-finite steps: a step whose base update has a NaN or inf in any leaf (or, in warm-up,
    whose gradient has one in a grouped leaf) is skipped, as ``optax.apply_if_finite`` does:
    the update is zero (parameters stay as they were), the state, the base optimizer's
    included, is unchanged except ``notfinite_count`` (:attr:`H2SPGInfo.skipped_steps`), and
    the skipped step does not count towards the phases. With ``nonfinite="raise"`` the step
    raises ``FloatingPointError`` instead (through a host callback run only on such a step).
    Zero flags are set only together with an update of exactly ``-params``.

    Args:
      space: the :class:`~asgssd_jax.SearchSpace` of the model; ``params`` passed to
        ``init``/``update`` are its ``variables["params"]`` (or the full variables).
      learning_rate: step size (scalar or optax schedule); the base optimizer's when ``base``
        is a name, and the scale of the group-lasso push.
      target_group_sparsity: fraction of the removal structures to remove, in [0, 1).
      warmup_steps: number of warm-up updates, >= 1.
      projection_steps: number of updates over which G_r is projected onto zero, >= 1.
      base: ``"sgd"`` (with ``momentum``), ``"adam"``, ``"adamw"`` or any optax
        transformation (then ``momentum`` and ``weight_decay`` are ignored).
      momentum: SGD momentum for ``base="sgd"``.
      weight_decay: L2 penalty for ``"sgd"``/``"adam"``, decoupled decay for ``"adamw"``.
      epsilon: half-space threshold :math:`\epsilon \ge 0` (scalar or schedule); larger
        projects sooner.
      group_lasso: the group-lasso coefficient :math:`\lambda` (scalar or schedule). None
        (default): one coefficient per redundant group, set at the search to
        :math:`\lambda_g = 2\|x_g\| / \sum_t \alpha_t` (the sum of the learning rate over the
        projection phase), so the push alone would take the group twice to zero over the
        phase and the half-space test zeroes it about half-way (a weighted group lasso;
        under ``inject_hyperparams`` the sum is the phase length times the current rate).
      lasso_amplify: DHSPG's amplification of the smallest effective :math:`\lambda`.
      lasso_max_factor: the adapted :math:`\lambda` is at most this times ``group_lasso``.
      fade_out: False (default): the half-space step above. True: OTO's later HESSO
        behaviour instead of the paper's, a scheduled fade-out, :math:`\mu_g = \|x_g\|/r +
        \max(0, \langle x_g, u_g\rangle)/\|x_g\|` with r the projection steps left, which
        takes 1/r of the norm each step so that the last projection step zeroes every group
        (``group_lasso`` is then unused).
      nonfinite: ``"skip"`` (default) or ``"raise"``, for a step with non-finite gradients.
      saliency: a :mod:`~asgssd_jax.optim.saliency` function or its name; smaller = more
        redundant. Default: DHSPG's cosine similarity and average magnitude.
      saliency_decay: decay of the saliency's exponential average.
      host_search: True (default): the search runs on the host through one
        ``jax.pure_callback``, so the train step does not compile it. False: the search runs
        in-graph (:func:`~asgssd_jax.optim.search.hierarchical_search`, the same result); the
        step then compiles it too (about 0.6 s for ResNet-18 on a CPU) but never touches the
        host, e.g. to serialize the train step with ``jax.export``, which cannot hold host
        callbacks.

    Returns:
      An ``optax.GradientTransformation`` whose state is an :class:`H2SPGState`.

    References:
      "Automated Search-Space Generation for Sub-network Search within Deep Neural
      Networks" (ASGSSD), Section 3.2 and Algorithm 3 (H2SPG).
      Chen, Wang, Ding, Ji, Yi, Zhu, "Half-Space Proximal Stochastic Gradient Method for
      Group-Sparsity Regularized Problem", arXiv:2009.12078, 2020 (HSPG).
      Chen, Liang, Ding, Zhu, Zharkov, "OTOv2: Automatic, Generic, User-Friendly", ICLR 2023
      (DHSPG: saliency, adaptive group lasso).
      Dai, Chen, Wang, Robinson, "An Adaptive Half-Space Projection Method for Stochastic
      Optimization Problems with Group Sparse Regularization", TMLR 2023 (AdaHSPG+).
    """
    return hybrid_sparse_optimizer(
        space, learning_rate, target_group_sparsity, warmup_steps=warmup_steps,
        projection_steps=projection_steps, base=base, momentum=momentum,
        weight_decay=weight_decay, epsilon=epsilon, group_lasso=group_lasso,
        lasso_amplify=lasso_amplify, lasso_max_factor=lasso_max_factor, fade_out=fade_out,
        nonfinite=nonfinite, saliency=saliency, saliency_decay=saliency_decay,
        search="hierarchical", redundant_step="half_space", name="h2spg",
        host_search=host_search)
