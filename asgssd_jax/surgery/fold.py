"""Constant folding: values cut off from every input become stored constants.

A constant that reaches a kept operation is evaluated once and stored, collapsed along the axes
where it does not vary (:func:`compact`) and broadcast back at run time, so one stored array
serves every input shape. That is only right when the axes whose size follows the batch are
collapsed: a constant whose batch axis was merged with another one (attention reshaping
``[B, T, D]`` to ``[B*H, T, D/H]``, heads into batch) varies along the merged axis. Such a
constant is kept as a *computed* value instead: the planner walks back from it through the
operations producing it until values that do broadcast over the batch, stores those, and the
sub-network re-runs the operations in between (with the shapes of the current input's trace).
Which axes follow the batch is read off a second trace of the same program at another batch
size. Constants stay in their rank (0-d ones too).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from asgssd_jax.surgery.plan import is_extended

__all__ = ["Folding", "compact"]


def compact(val: Any) -> Any:
    """Collapses every axis along which ``val`` does not vary to size 1 (0-d stays 0-d)."""
    if is_extended(getattr(val, "dtype", None) or np.float32):
        return val
    val = np.asarray(val)
    for axis in range(val.ndim):
        if val.shape[axis] > 1:
            first = np.take(val, [0], axis=axis)
            if np.array_equal(val, np.broadcast_to(first, val.shape),
                              equal_nan=np.issubdtype(val.dtype, np.inexact)):
                val = first
    return np.array(val, copy=True, order="C")


class Folding:
    """Folded and computed constants (a mixin of :class:`~.planner.Planner`)."""

    def batch_axes(self, var: int) -> tuple[int, ...]:
        """Axes of ``var`` whose size changes with the batch size (from the twin trace)."""
        if self.twin is None:
            return ()
        here, there = self.p.shape(var), self.twin.shape(var)
        return tuple(a for a in range(len(here)) if here[a] != there[a])

    def bakeable(self, var: int, val: Any) -> bool:
        """Whether ``val`` (compacted) broadcasts to ``var``'s shape at every batch size."""
        shape = np.shape(val)
        return all(shape[a] == 1 for a in self.batch_axes(var))

    def constants(self) -> None:
        """``self.consts`` (stored), ``self.computed`` and ``self.const_inputs`` for the
        constants that kept operations read."""
        p = self.p
        self.consts: dict[int, Any] = {}
        self.computed: dict[int, tuple[int, ...]] = {}
        self.const_inputs: dict[int, Any] = {}
        self.values([x for x in self.bake if x not in self.zero])
        for x, r in self.bake.items():
            if x in self.zero:
                aval = p.avals[x]
                val = np.zeros((1,) * len(aval.shape), aval.dtype)
            else:
                val = compact(self.value(x))
            if not self.bakeable(x, val):
                self.computed[x] = self._computation(x)
                continue
            if r is not None:
                axis, _, keep = r
                if val.shape[axis] != 1:
                    val = np.take(val, keep, axis=axis)
            self.consts[x] = val

    def _computation(self, target: int) -> tuple[int, ...]:
        """Operations from stored values that broadcast over the batch to ``target``."""
        p = self.p
        ops: set[int] = set()
        stack = [target]
        seen: set[int] = set()
        while stack:
            x = stack.pop()
            if x in seen:
                continue
            seen.add(x)
            if x != target and (x in self.leaf_index or x in p.consts):
                self.const_inputs.setdefault(x, compact(self.value(x)))
                continue
            if x != target:
                val = (np.zeros((1,) * len(p.shape(x)), p.avals[x].dtype) if x in self.zero
                       else compact(self.value(x)))
                if self.bakeable(x, val):
                    self.const_inputs.setdefault(x, val)
                    continue
            i = p.producer[x]
            ops.add(i)
            stack.extend(v for v in p.ops[i].invars if isinstance(v, int))
        return tuple(sorted(ops))
