"""``construct_subnetwork``: plans every mode of a network with its zero groups removed."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from asgssd_jax.program import slice_path
from asgssd_jax.search_space import SearchSpace
from asgssd_jax.surgery.linen import SubNetwork
from asgssd_jax.surgery.plan import (
    Mask,
    ModePlan,
    SubNetworkPlan,
    SurgeryError,
    bind_kwargs,
    kwargs_key,
    mask_equal,
    mask_key,
    split_kwargs,
    typed_rngs,
)
from asgssd_jax.surgery.planner import plan_program, signature
from asgssd_jax.trace import Program, TraceError, leaf_path, trace_program

__all__ = ["construct_subnetwork", "relative_difference"]


def _linen_collections(apply_fn: Callable[..., Any], variables: Any) -> tuple[str, ...] | None:
    """Non-parameter collections of a linen ``Module.apply`` (None for other apply_fns)."""
    owner = getattr(apply_fn, "__self__", None)
    if not isinstance(owner, nn.Module) or getattr(apply_fn, "__func__", None) is not \
            nn.Module.apply:
        return None
    if not isinstance(variables, Mapping):
        return None
    return tuple(sorted(str(c) for c in variables if c != "params"))


def _output_kinds(program: Program, mutable: Sequence[str]) -> list[tuple[str, str | None]]:
    n = len(program.outvars)
    if not mutable:
        return [("main", None)] * n
    tree = jax.tree_util.tree_unflatten(program.out_tree, list(range(n)))
    kinds: list[tuple[str, str | None]] = [("main", None)] * n
    for path, pos in jax.tree_util.tree_flatten_with_path(tree[1])[0]:
        kinds[pos] = ("state", leaf_path(path))
    return kinds


def _batch_size(args: Any) -> int | None:
    """The common leading axis of the inputs (None without one)."""
    leaves = jax.tree_util.tree_leaves(args)
    if not leaves or any(len(a.shape) == 0 or a.shape[0] != leaves[0].shape[0] for a in leaves):
        return None
    return int(leaves[0].shape[0])


def _with_batch(args: Any, batch: int) -> Any:
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct((batch, *a.shape[1:]), a.dtype), args)


def _missing_rng(error: BaseException) -> str | None:
    """The rng stream a linen model asked for, if ``error`` is flax's InvalidRngError."""
    e: BaseException | None = error
    while e is not None:
        m = re.search(r'needs PRNG for "([^"]+)"', str(e))
        if m:
            return m.group(1)
        e = e.__cause__
    return None


def construct_subnetwork(
    space: SearchSpace,
    variables: Any,
    *,
    modes: Iterable[Mapping[str, Any]] | None = None,
) -> Any:
    """Builds the sub-network of ``variables``' zero groups (Section 3.3, Figure 4).

    A group is removed when every one of its leaves is exactly 0 in ``variables``. The result
    computes what ``space.apply_fn(variables, x, **space.apply_kwargs)`` computes (to float
    rounding: relative 1e-5 in float32; in bfloat16 or float16 within that format's own
    rounding of the zeroed network) for inputs of any batch size, without the removed
    structures, the joints they leave with one input, the consumer channels they fed and the
    code that only served them. ``variables`` may be any pytree; ``sub.variables`` keeps its
    kind (see :class:`SubNetwork`).

    Args:
      space: the search space of the network, from :func:`generate_search_space`.
      variables: the full network's variables with the removed groups at zero (e.g. H2SPG's
        result, or ``space.zero_groups(variables, indices)``); for a space generated from an
        ``nnx.Module``, the (trained) module itself or its whole state, ``nnx.state(model)``
        (e.g. restored from a checkpoint).
      modes: keyword-argument sets of ``apply_fn`` to plan, besides the space's own; by default
        also the opposite ``train`` flag when the space was traced with one (with the rng
        streams a linen model asks for, e.g. ``rngs={"dropout": ...}``). Array-valued
        arguments (``rngs=``) are inputs of the program: their sample values only give shapes.

    Returns:
      A :class:`SubNetwork`; ``sub.apply(sub.variables, x, **kwargs)`` runs it. For an
      ``nnx.Module``, an :class:`~asgssd_jax.surgery.nnx_module.NNXSubNetwork` (an
      ``nnx.Module`` in eval mode; ``sub.train()`` switches it like any NNX module).

    Raises:
      SurgeryError: the zero groups form an invalid set (they disconnect an output from an
        input), or ``variables`` do not match the space.
    """
    program = space.trace.program
    apply_fn = space.apply_fn
    base_static, base_dynamic = split_kwargs(space.apply_kwargs)
    if _is_nnx_state(variables):
        variables = _merge_nnx_state(space, variables)
    nnx_module = variables if _is_nnx_module(variables) else None
    if nnx_module is not None:  # NNX front-end: both modes of the module's functional form
        from asgssd_jax.surgery.nnx_module import nnx_apply, nnx_variables

        variables, nnx_vars = nnx_variables(nnx_module)
        apply_fn, base_static, base_dynamic = nnx_apply(nnx_module), {"train": False}, {}
    elif variables is space.variables and hasattr(space.apply_fn, "nnx_graphdef"):
        warnings.warn(
            "space.variables of an NNX model is a snapshot taken when the space was generated: "
            "after training it holds the old values. Pass the module itself: "
            "construct_subnetwork(space, model)", stacklevel=2)
    flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
    paths = [leaf_path(p) for p, _ in flat]
    leaf_values = [leaf for _, leaf in flat]
    if paths != list(space.leaf_paths):
        missing = sorted(set(space.leaf_paths) - set(paths))[:3]
        extra = sorted(set(paths) - set(space.leaf_paths))[:3]
        raise SurgeryError(
            "variables do not match the search space: "
            + (f"missing {missing}" if missing else "")
            + (", " if missing and extra else "") + (f"unexpected {extra}" if extra else "")
            + ("" if missing or extra else "same paths in another order")
            + ". Pass the full variables tree (all collections) of the network the space was "
            "generated from")
    for path, leaf, v in zip(paths, leaf_values, program.leaf_vars):
        want = tuple(program.avals[v].shape)
        if tuple(np.shape(leaf)) != want:
            raise SurgeryError(f"variable {path!r} has shape {tuple(np.shape(leaf))}, the search "
                               f"space traced it with {want}")
    zero = space.zero_group_indices(variables)
    if zero and not space.is_valid(zero):
        names = "; ".join(f"g{i} ({', '.join(space.groups[i].param_paths)})" for i in zero)
        raise SurgeryError(
            f"the zero groups {zero} form an invalid set: without them an output loses an "
            f"input it depends on. Zero groups: {names}. Keep at least one of them non-zero "
            "(space.is_valid checks a set)")
    # whole leaves (their index) and slices of leaves ((leaf, axis, index): scanned layers)
    removed: set[Any] = set()
    for g in zero:
        for sl in space.groups[g].slices:
            if sl.axis is None:
                removed.add(sl.leaf)
            else:
                removed.update((sl.leaf, sl.axis, j) for j in sl.indices)
    specs = [jax.ShapeDtypeStruct(program.avals[v].shape, program.avals[v].dtype)
             for v in program.arg_vars]
    arg_tree = program.arg_tree
    sample_args = (jax.tree_util.tree_unflatten(arg_tree, specs) if arg_tree is not None
                   else tuple(specs))
    collections = ("state",) if nnx_module is not None else _linen_collections(apply_fn,
                                                                                 variables)
    batch0 = _batch_size(sample_args)
    sig_cache: dict[int, str] = {}

    def sig(prog: Program) -> str:
        if id(prog) not in sig_cache:
            sig_cache[id(prog)] = signature(prog)
        return sig_cache[id(prog)]

    def plan_mode(static, dynamic, mutable, kept_state, program=None) -> list[ModePlan]:
        """Plans at the sample's batch size and, if its program differs (a model may skip
        no-op broadcasts at batch size 1), at a second one; each with a twin trace at another
        batch size that tells which constants follow the batch."""
        call_static = dict(static, mutable=list(mutable)) if mutable else dict(static)
        fn = bind_kwargs(apply_fn, call_static, sorted(dynamic))
        extra = [dict(dynamic)] if dynamic else []
        traces: dict[Any, Program | None] = {}
        if program is not None:
            traces[batch0] = program

        def at(batch):
            if batch not in traces:
                args = sample_args if batch == batch0 else _with_batch(sample_args, batch)
                try:
                    traces[batch] = trace_program(fn, variables, *args, *extra)[0]
                except TraceError:
                    if batch == batch0:
                        raise
                    traces[batch] = None
            return traces[batch]

        programs = [(batch0, at(batch0))]
        alt_batch = None if batch0 is None else (2 if batch0 == 1 else 1)
        if alt_batch is not None:
            alt = at(alt_batch)
            if alt is not None and sig(alt) != sig(programs[0][1]):
                programs.append((alt_batch, alt))
        plans = []
        for b, prog in programs:
            twin = None
            for other in (alt_batch, batch0, 2 if b != 2 else 3):  # traced ones first
                if b is not None and other is not None and other != b and at(other) is not None \
                        and sig(at(other)) == sig(prog):
                    twin = at(other)
                    break
            plans.append(plan_program(prog, leaf_values, removed, _output_kinds(prog, mutable),
                                      kept_state, static, dynamic, mutable, twin))
        return plans

    # inference mode, on the space's own program first
    mode_plans = plan_mode(base_static, base_dynamic, (), None,
                           program if apply_fn is space.apply_fn and not base_dynamic else None)
    unavailable: dict[tuple, str] = {}
    wanted = [dict(m) for m in (modes or ())]
    if modes is None and isinstance(base_static.get("train"), bool):
        wanted.append({"train": not base_static["train"]})
    kept_paths = {paths[i] for i in mode_plans[0].leaves}
    for kw in wanted:
        static, dynamic = split_kwargs(typed_rngs({**base_static, **base_dynamic, **kw}))
        if kwargs_key(static, dynamic) == mode_plans[0].key():
            continue
        for _ in range(8):  # linen: add each rng stream the model asks for
            try:
                mode_plans.extend(plan_mode(static, dynamic, collections or (), kept_paths))
                break
            except (TraceError, SurgeryError) as e:
                name = _missing_rng(e) if modes is None and collections is not None else None
                if name is None or name in dynamic.get("rngs", {}):
                    unavailable[kwargs_key(static, dynamic)] = str(e)
                    break
                dynamic = {**dynamic, "rngs": {**dynamic.get("rngs", {}),
                                               name: jax.random.key(0)}}
    mode_plans, kept, leaf_slices = _reconcile(mode_plans, paths, unavailable)
    plan = SubNetworkPlan(
        treedef=treedef,
        leaf_avals=tuple(jax.tree_util.tree_leaves(jax.eval_shape(lambda t: t, variables))),
        kept=kept, leaf_slices=leaf_slices, removed_groups=tuple(zero),
        removed_paths=tuple(sorted(
            paths[r] if isinstance(r, int) else slice_path(paths[r[0]], r[1], (r[2],))
            for r in removed)),
        modes=tuple(mode_plans), sample_args=sample_args, unavailable=unavailable)
    kept_values = {i: _slice_leaf(leaf_values[i], leaf_slices.get(i)) for i in kept}
    if nnx_module is not None:
        from asgssd_jax.surgery.nnx_module import NNXSubNetwork

        return NNXSubNetwork(plan, apply_fn, {paths[i]: nnx_vars[paths[i]].replace(x)
                                              for i, x in kept_values.items()})
    return SubNetwork(plan=plan, apply_fn=apply_fn, attached=plan.pruned(kept_values))


def _is_nnx_module(x: Any) -> bool:
    from flax import nnx

    return isinstance(x, nnx.Module)


def _merge_nnx_state(space: SearchSpace, state: Any) -> Any:
    """The module an ``nnx.State`` (``nnx.state(model)``) is the state of."""
    from flax import nnx

    graphdef = getattr(space.apply_fn, "nnx_graphdef", None)
    if graphdef is None:
        raise SurgeryError("an nnx.State was passed, but the space was not generated from an "
                           "nnx.Module: pass the variables the space was traced with")
    try:
        return nnx.merge(graphdef, state)
    except (ValueError, KeyError, TypeError) as e:
        raise SurgeryError(
            "this nnx.State does not match the module the space was generated from; pass the "
            f"whole state, nnx.state(model), or the module itself ({type(e).__name__}: {e})"
        ) from None


def _is_nnx_state(x: Any) -> bool:
    from flax import nnx

    return isinstance(x, nnx.State)


def _slice_leaf(x: Any, m: Mask | None) -> Any:
    if m is None:
        return jnp.asarray(x)
    return jnp.take(jnp.asarray(x), m[2], axis=m[0])


def _reconcile(mode_plans: list[ModePlan], paths: Sequence[str], unavailable: dict[tuple, str]
               ) -> tuple[list[ModePlan], tuple[int, ...], dict[int, Mask]]:
    """One slice per kept leaf across modes (a mode that wants another slices on read), and
    mutable state outputs shaped like their leaves."""
    kept = sorted({i for m in mode_plans for i in m.leaves})
    slices: dict[int, Mask] = {}
    for i in kept:
        wants = [m.leaf_slices.get(i) for m in mode_plans if i in m.leaves]
        if len({mask_key(w) for w in wants}) == 1 and wants[0] is not None:
            slices[i] = wants[0]
            continue
        for m in mode_plans:  # disagreement: keep the leaf whole
            r = m.leaf_slices.pop(i, None)
            if r is not None:
                for use in m.leaf_uses.get(i, ()):
                    m.gathers[use] = r
    index = {p: i for i, p in enumerate(paths)}
    ok = [mode_plans[0]]
    for m in mode_plans[1:]:
        problem = None
        for pos, path in m.state_outputs.items():
            want = slices.get(index[path])
            have = m.state_masks[pos]
            if isinstance(have, str):  # the leaf itself
                continue
            if mask_equal(have, want):
                continue
            if have is None:
                m.gathers[(-1, pos)] = want
            else:
                problem = f"its update of {path!r} is sliced unlike the variable"
        if problem is None:
            ok.append(m)
        else:
            unavailable[m.key()] = problem
    return ok, tuple(kept), slices


def relative_difference(ref: Any, got: Any) -> float:
    """max |ref - got| / max |ref| over the leaves of two output trees (in float64): how far a
    sub-network's outputs are from the zeroed full network's. ``inf`` if the structures or
    shapes differ, or if the non-finite entries (NaN, Inf) are not the same in both."""
    ref_leaves, got_leaves = jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)
    if len(ref_leaves) != len(got_leaves):
        return float("inf")
    worst = 0.0
    for r, g in zip(ref_leaves, got_leaves):
        r, g = np.asarray(r, np.float64), np.asarray(g, np.float64)
        if r.shape != g.shape:
            return float("inf")
        finite = np.isfinite(r)
        if not np.array_equal(finite, np.isfinite(g)) or not np.array_equal(
                r[~finite], g[~finite], equal_nan=True):
            return float("inf")
        r, g = r[finite], g[finite]
        worst = max(worst, float(np.max(np.abs(r - g), initial=0.0)
                                 / (np.max(np.abs(r), initial=0.0) + 1e-12)))
    return worst
