"""The sub-network front-end for Flax NNX: a trained ``nnx.Module`` in, an ``nnx.Module`` out.

:func:`nnx_apply` turns a module into ``apply_fn(variables, *args, train=False, mutable=())``
over ``{"params": ..., "state": ...}`` pure dicts (the paths the search space uses), with one
graph definition per mode taken from copies of the module after ``.eval()`` and ``.train()``;
with ``mutable`` it also returns the updated state (BatchNorm statistics, rng stream counts).
Both modes are planned like any other function's. :class:`NNXSubNetwork` holds the kept
variables as the original ``nnx.Variable`` types (``nnx.Param`` sliced where channels were
removed, ``nnx.BatchStat``, rng keys and counts) under the module's own attribute paths.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from asgssd_jax.surgery.linen import run_leaves
from asgssd_jax.surgery.plan import SubNetworkPlan, SurgeryError

__all__ = ["NNXSubNetwork", "nnx_apply", "nnx_variables"]


def nnx_variables(module: nnx.Module) -> tuple[dict[str, Any], dict[str, nnx.Variable]]:
    """``({"params": ..., "state": ...}, {leaf path: nnx.Variable})`` of ``module``."""
    _, params, rest = nnx.split(module, nnx.Param, ...)
    variables = {"params": nnx.to_pure_dict(params), "state": nnx.to_pure_dict(rest)}
    by_path = {}
    for col, state in (("params", params), ("state", rest)):
        for path, var in state.flat_state():
            by_path["/".join([col, *map(str, path)])] = var
    return variables, by_path


def nnx_apply(module: nnx.Module) -> Callable[..., Any]:
    """``apply_fn(variables, *args, train=False, mutable=())`` of ``module`` (see the module
    docstring); the module itself is not changed."""
    graphs = {}
    for train in (False, True):
        copy = nnx.clone(module)
        copy.train() if train else copy.eval()
        graphs[train] = nnx.split(copy, nnx.Param, ...)

    def apply_fn(variables, *args, train: bool = False, mutable=(), **kwargs):
        graphdef, params, rest = graphs[bool(train)]
        params = jax.tree_util.tree_map(lambda x: x, params)
        rest = jax.tree_util.tree_map(lambda x: x, rest)
        nnx.replace_by_pure_dict(params, variables["params"])
        nnx.replace_by_pure_dict(rest, variables["state"])
        model = nnx.merge(graphdef, params, rest)
        out = model(*args, **kwargs)
        if not mutable:
            return out
        _, _, new_rest = nnx.split(model, nnx.Param, ...)
        return out, {"state": nnx.to_pure_dict(new_rest)}

    return apply_fn


def _key(k: Any) -> Any:
    return str(k)


class NNXSubNetwork(nnx.Module):
    """A constructed sub-network as an ``nnx.Module``.

    ``sub(x)`` runs it in the mode last set by ``sub.eval()`` / ``sub.train()`` (train mode
    updates its ``nnx.BatchStat`` statistics and advances its rng streams, as the full model
    does). Its variables sit under the original module's attribute paths (``nnx.state(sub)``),
    so ``nnx.Optimizer(sub, tx, wrt=nnx.Param)``, ``nnx.split`` / ``nnx.merge`` and orbax work
    as for any module.

    Attributes:
      plan: the :class:`~asgssd_jax.surgery.SubNetworkPlan`.
      apply_fn: the functional form of the original module (:func:`nnx_apply`).
    """

    def __init__(self, plan: SubNetworkPlan, apply_fn: Callable[..., Any],
                 variables: dict[str, nnx.Variable], *, training: bool = False):
        self.plan = plan
        self.apply_fn = apply_fn
        self.deterministic = not training
        self.use_running_average = not training
        paths = []
        tree: dict[str, Any] = {}
        for i in plan.kept:
            parts = plan.leaf_paths[i].split("/")[1:]  # without "params/" or "state/"
            node = tree
            for k in parts[:-1]:
                node = node.setdefault(_key(k), {})
            node[_key(parts[-1])] = variables[plan.leaf_paths[i]]
            paths.append(tuple(_key(k) for k in parts))
        self._paths = tuple(paths)
        for name, sub in tree.items():
            if hasattr(type(self), name) or name in vars(self):
                raise SurgeryError(f"the module's attribute {name!r} clashes with an attribute "
                                   "of the sub-network module; rename it in the model")
            setattr(self, name, _to_nnx(sub))

    @property
    def removed_groups(self) -> tuple[int, ...]:
        """Indices of the search space's groups that were removed."""
        return self.plan.removed_groups

    @property
    def variables(self) -> Any:
        """The kept values as ``{"params": ..., "state": ...}`` pure dicts (for
        :meth:`apply`, ``count_params``, ``save_subnetwork`` and ``export_subnetwork``)."""
        return self.plan.pruned({i: self._variable(p).get_value()
                                 for i, p in zip(self.plan.kept, self._paths)})

    def apply(self, variables: Any, *args: Any, train: bool = False, mutable: Any = False,
              **kwargs: Any) -> Any:
        """The functional form: runs on ``variables`` (like :attr:`variables`) without
        touching the module; with ``mutable`` returns ``(output, {"state": updates})``."""
        result, state = run_leaves(self.plan, self.apply_fn, self.plan.kept_leaves(variables),
                                   args, dict(kwargs, train=train))
        return (result, state) if mutable else result

    def _variable(self, path: tuple[str, ...]) -> nnx.Variable:
        node: Any = self
        for k in path:
            node = getattr(node, k) if isinstance(node, nnx.Module) else node[k]
        return node

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        training = not (self.deterministic and self.use_running_average)
        leaves = [self._variable(p).get_value() for p in self._paths]
        kwargs = dict(kwargs, train=training)  # train mode was planned with mutable state
        result, state = run_leaves(self.plan, self.apply_fn, leaves, args, kwargs)
        if training:
            updates = dict(jax.tree_util.tree_flatten_with_path(state.get("state", {}))[0])
            by_path = {"/".join(p): p for p in self._paths}
            for key_path, value in updates.items():
                path = "/".join(str(getattr(k, "key", k)) for k in key_path)
                if path in by_path:
                    self._variable(by_path[path]).set_value(value)
        return result


def _to_nnx(tree: Any) -> Any:
    if isinstance(tree, dict):
        return nnx.Dict({k: _to_nnx(v) for k, v in tree.items()})
    return tree
