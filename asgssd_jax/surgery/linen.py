"""The sub-network front-end for linen models and plain functions: :class:`SubNetwork`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax

from asgssd_jax.surgery.plan import SubNetworkPlan, SurgeryError, split_kwargs, typed_rngs
from asgssd_jax.surgery.runner import runner_for

__all__ = ["SubNetwork", "run_leaves", "run_plan"]


def _unflatten_paths(paths: Sequence[str], leaves: Sequence[Any]) -> dict:
    out: dict = {}
    for p, leaf in zip(paths, leaves):
        node = out
        parts = p.split("/")
        for k in parts[:-1]:
            node = node.setdefault(k, {})
        node[parts[-1]] = leaf
    return out


def run_plan(plan: SubNetworkPlan, apply_fn: Callable[..., Any], variables: Any,
             args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[Any, dict[str, dict]]:
    """Runs the sub-network: ``(result, {collection: updated state})`` (the latter for modes
    traced with mutable linen collections)."""
    return run_leaves(plan, apply_fn, plan.kept_leaves(variables), args, kwargs)


def run_leaves(plan: SubNetworkPlan, apply_fn: Callable[..., Any], leaves: Sequence[Any],
               args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[Any, dict[str, dict]]:
    """:func:`run_plan` on the kept leaves in plan order."""
    static, dynamic = split_kwargs(typed_rngs(dict(plan.modes[0].kwargs, **kwargs)))
    if "rngs" in dynamic and not any("rngs" in m.dynamic for m in plan.modes):
        del dynamic["rngs"]  # as linen does, streams the model never draws from are ignored
    run = runner_for(plan, apply_fn, static, dynamic, args)
    mode = run.mode
    outs = run(leaves, (*args, dynamic) if dynamic else args)
    by_pos = dict(zip(mode.outputs, outs))
    tree = run.out_tree
    main_tree = tree.children()[0] if mode.mutable else tree
    result = jax.tree_util.tree_unflatten(main_tree, [by_pos[p] for p in mode.main_outputs])
    state: dict[str, dict] = {}
    for col in mode.mutable:
        items = [(path.split("/", 1)[1], by_pos[p]) for p, path in mode.state_outputs.items()
                 if path.split("/", 1)[0] == col]
        state[col] = _unflatten_paths([k for k, _ in items], [v for _, v in items])
    return result, state


class SubNetwork(nn.Module):
    """A constructed sub-network: a linen Module carrying its (pruned) variables.

    ``sub.apply(sub.variables, x, **kwargs)`` runs it like the original ``apply_fn``, at any
    batch size. ``sub.variables`` is a tree of the user's own kind: dicts without the removed
    entries (a collection left without leaves stays, empty), and tuples, lists, dataclasses and
    other pytree nodes with ``None`` where a leaf (or a whole subtree) was removed. For linen
    models ``train=True, mutable=["batch_stats"]`` returns the updated BatchNorm statistics and
    ``rngs={"dropout": key}`` reaches the original ``apply_fn`` (the same masks as the full
    network's where the same operations remain); any keyword argument holding arrays is passed
    through the same way. It re-traces the original ``apply_fn`` once per input shape and mode
    and runs the rewritten program, so gradients, ``jit``, ``vmap``, orbax and ``jax.export``
    work as for any function. (The rewritten program is made of primitives: custom derivative
    rules of the original, e.g. ``custom_jvp`` of ``relu``, give way to the derivatives of the
    primitives they wrap.) Inside another linen module it runs on its scope's collections.

    Attributes:
      plan: the :class:`SubNetworkPlan` (architecture: what is kept, sliced and folded).
      apply_fn: the original network's ``apply_fn``.
    """

    plan: SubNetworkPlan
    apply_fn: Callable[..., Any]
    attached: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)

    @property
    def variables(self) -> Any:
        """The pruned variables (unbound), or the bound variables inside a linen parent."""
        if self.scope is None:
            if self.attached is None:
                raise ValueError("this SubNetwork carries no variables")
            return self.attached
        return self.scope.variables()

    @property
    def removed_groups(self) -> tuple[int, ...]:
        """Indices of the search space's groups that were removed."""
        return self.plan.removed_groups

    def with_variables(self, variables: Any) -> SubNetwork:
        """The same sub-network carrying other variables (e.g. after fine-tuning)."""
        self.plan.kept_leaves(variables)
        return self.clone(attached=variables, parent=None)

    def apply(self, variables: Any, *args: Any, rngs: Any = None, method: Any = None,
              mutable: Any = False, **kwargs: Any) -> Any:
        """Runs the sub-network on ``variables`` (any pytree like ``sub.variables``).

        Returns the output, or ``(output, updated_state)`` with ``mutable`` (linen models)."""
        if method is not None:
            raise SurgeryError("a SubNetwork has one method; call sub.apply(variables, *args)")
        if rngs is not None:
            kwargs["rngs"] = rngs
        result, state = run_plan(self.plan, self.apply_fn, variables, args, kwargs)
        if not mutable:
            return result
        wanted = set(state) if mutable is True else (
            {mutable} if isinstance(mutable, str) else set(mutable))
        return result, {c: s for c, s in state.items() if c in wanted}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.is_initializing():
            raise SurgeryError("a SubNetwork is not initialised: its variables are "
                               "sub.variables (construct_subnetwork builds them)")
        result, state = run_plan(self.plan, self.apply_fn, self.scope.variables(), args,
                                 kwargs)
        for col, tree in state.items():
            if self.is_mutable_collection(col):
                for name, value in tree.items():
                    self.put_variable(col, name, value)
        return result
