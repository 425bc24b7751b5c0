"""Flax NNX front-end of tracing: a module as a pure function of its variables, with its
submodules' calls named by attribute path."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import jax

__all__ = ["nnx_functional", "nnx_module_scopes"]


def _is_nnx_module(obj: Any) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, nnx.Module)


def nnx_functional(module) -> tuple[Callable[..., Any], dict[str, Any]]:
    """Splits an ``nnx.Module`` into ``apply_fn(variables, *args, **kwargs)`` and variables.

    ``variables`` is ``{"params": ..., "state": ...}`` of plain nested dicts, so parameter paths
    read ``"params/linear/kernel"`` as for linen.
    """
    from flax import nnx

    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    variables = {"params": nnx.to_pure_dict(params), "state": nnx.to_pure_dict(rest)}

    def apply_fn(variables, *args, **kwargs):
        p = jax.tree_util.tree_map(lambda x: x, params)
        r = jax.tree_util.tree_map(lambda x: x, rest)
        nnx.replace_by_pure_dict(p, variables["params"])
        nnx.replace_by_pure_dict(r, variables["state"])
        merged = nnx.merge(graphdef, p, r)
        with nnx_module_scopes(merged):
            return merged(*args, **kwargs)

    # What a later nnx.State of this module is merged with (construct_subnetwork takes one).
    apply_fn.nnx_graphdef = graphdef
    return apply_fn, variables


@contextlib.contextmanager
def nnx_module_scopes(module) -> Iterator[None]:
    """While tracing, each call of a submodule of ``module`` runs in a ``jax.named_scope`` of
    its attribute path relative to its caller, so that the jaxpr's name stacks read
    ``blocks/3/attn/q_proj`` as linen's do (NNX itself names nothing). The submodules' classes
    get a wrapped ``__call__`` for the duration. Inside a lifted transform (``nnx.scan`` over
    an ``nnx.vmap``-built stack) the modules called are copies: a copy is named as the
    attribute of its caller that it is, or, at the top, as the one submodule of its class. A
    call of any other instance is not renamed.
    """
    from flax import nnx

    paths = {id(node): tuple(str(k) for k in path) for path, node in nnx.iter_graph(module)
             if path and isinstance(node, nnx.Module)}
    classes = {type(node) for _, node in nnx.iter_graph(module) if isinstance(node, nnx.Module)}
    by_class: dict[type, list[tuple[str, ...]]] = {}
    for path, node in nnx.iter_graph(module):
        if path and isinstance(node, nnx.Module):
            by_class.setdefault(type(node), []).append(tuple(str(k) for k in path))
    originals = {cls: (cls.__dict__.get("__call__"), cls.__call__) for cls in classes
                 if "__call__" in dir(cls)}
    stack: list[tuple[tuple[str, ...], Any]] = [((), None)]

    def resolve(instance) -> tuple[str, ...] | None:
        path = paths.get(id(instance))
        if path is not None:
            return path
        outer, caller = stack[-1]
        if caller is not None:
            for name, value in vars(caller).items():
                if value is instance:
                    return (*outer, name)
        found = by_class.get(type(instance), [])
        return found[0] if len(found) == 1 else None

    def wrap(call):
        def scoped(self, *args, **kwargs):
            path = resolve(self)
            if path is None:
                return call(self, *args, **kwargs)
            outer = stack[-1][0]
            rel = path[len(outer):] if path[:len(outer)] == outer else path
            stack.append((path, self))
            try:
                with jax.named_scope("/".join(rel) or path[-1]):
                    return call(self, *args, **kwargs)
            finally:
                stack.pop()
        return scoped

    try:
        for cls, (_, call) in originals.items():
            cls.__call__ = wrap(call)
        yield
    finally:
        for cls, (own, _) in originals.items():
            if own is None:
                del cls.__call__
            else:
                cls.__call__ = own
