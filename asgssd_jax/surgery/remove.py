"""Step 1 of Section 3.3: remove the zero removal structures, by constant propagation.

Every value of the traced program is *data* (depends on an input, or on a PRNG key held in the
variables, whose draws change from call to call), *static* (computed from kept variables alone:
parameters, BatchNorm statistics) or *constant* (independent of the
input because a removed group's zero leaves reach it). A multiplication, convolution or dot
product of data with a constant exact zero is constant zero, and so is a ``select_n`` whose every
case is zero (dropout of a removed branch); so a zeroed structure's output becomes constant
(usually 0, e.g. 0.5 after a sigmoid) and its operations leave the program. (A value multiplied
by a removed zero is taken to be finite: the search space checks zero-invariance.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import core as jex_core

from asgssd_jax.primitives import ZERO_KILLING as KILLING
from asgssd_jax.surgery.plan import is_extended, to_host

__all__ = ["CONST", "DATA", "STATIC", "Removal", "is_literal"]

DATA, STATIC, CONST = 0, 1, 2

#: f(0) == 0 exactly: a constant computed from known zeros by these stays a known zero.
ZERO_UNARY = frozenset(
    """neg convert_element_type reshape broadcast_in_dim transpose squeeze reduce_sum
    reduce_window_sum copy copy_p slice rev abs sqrt sign tanh sin tan expm1 log1p erf
    reduce_precision cumsum real imag""".split()
)
ZERO_NARY = frozenset({"add", "add_any", "sub", "max", "min", "concatenate"})
#: One-off evaluations of constants: compile fast rather than run fast.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def is_literal(x: Any) -> bool:
    return isinstance(x, jex_core.Literal)


def literal_zero(x: Any) -> bool:
    return is_literal(x) and not np.any(np.asarray(x.val))


class Removal:
    """Constant propagation over ``self.p`` (a mixin of :class:`~.planner.Planner`)."""

    # -- values of input-independent variables -------------------------------------------------
    def value(self, var: int) -> Any:
        return self.values([var])[0]

    def values(self, targets: Sequence[int]) -> list[Any]:
        """Concrete values of input-independent variables, computed by one jitted replay."""
        p = self.p
        need: set[int] = set()
        inputs: dict[int, Any] = {}
        stack = [v for v in targets if v not in self.vals]
        seen: set[int] = set()
        while stack:
            x = stack.pop()
            if x in self.vals or x in seen:
                continue
            seen.add(x)
            if x in self.leaf_index:
                inputs[x] = self.leaf_values[self.leaf_index[x]]
                continue
            if x in p.consts:
                inputs[x] = p.consts[x]
                continue
            i = p.producer.get(x)
            if i is None:  # pragma: no cover - an input: never asked for
                raise AssertionError("input value requested")
            if i in self.killed or x in self.zero:
                aval = p.avals[x]
                self.vals[x] = np.zeros(aval.shape, aval.dtype)
                continue
            need.add(i)
            stack.extend(v for v in p.ops[i].invars if isinstance(v, int))
        if need:
            ops = [p.ops[i] for i in sorted(need)]
            known = {v: self.vals[v] for op in ops for v in op.invars
                     if isinstance(v, int) and v in self.vals}
            known.update(inputs)
            outs = sorted({o for op in ops for o in op.outvars})
            names = list(known)

            def replay(*vals):
                env = dict(zip(names, vals))
                for op in ops:
                    ins = [v.val if is_literal(v) else env[v] for v in op.invars]
                    res = op.primitive.bind(*ins, **op.params)
                    env.update(zip(op.outvars, res if op.primitive.multiple_results else [res]))
                return [env[o] for o in outs]

            results = jax.jit(replay, compiler_options=FAST_COMPILE)(*[known[v] for v in names])
            self.vals.update(zip(outs, (to_host(r) for r in results)))
        for x, val in inputs.items():
            self.vals[x] = to_host(val)
        return [self.vals[v] for v in targets]

    def is_zero(self, x: Any) -> bool:
        if is_literal(x):
            return False  # literals come from the original network: never removed
        if self.cls.get(x) != CONST:
            return False
        if x in self.zero:
            return True
        val = self.value(x)
        if not np.any(val):
            self.zero.add(x)
            return True
        return False

    def classify(self) -> None:
        """Data / static / constant for every value; kills of data by removed zeros."""
        p, cls = self.p, self.cls
        for i, v in enumerate(p.leaf_vars):
            if i in self.removed:
                cls[v] = CONST
                self.zero.add(v)
            elif is_extended(p.avals[v].dtype):  # a PRNG key: a new draw at every call
                cls[v] = DATA
            else:
                cls[v] = STATIC
        for v in p.consts:
            cls[v] = STATIC
        for v in p.arg_vars:
            cls[v] = DATA
        for op in p.ops:
            if op.index in self.removed_slices:  # a removed slice of a leaf (a scanned layer)
                for o in op.outvars:
                    cls[o] = CONST
                    self.zero.add(o)
                continue
            ins = [v for v in op.invars if isinstance(v, int)]
            kinds = {cls[v] for v in ins}
            if DATA in kinds:
                if self._killed(op, ins):
                    self.killed.add(op.index)
                    for o in op.outvars:
                        cls[o] = CONST
                        self.zero.add(o)
                    continue
                for o in op.outvars:
                    cls[o] = DATA
                self.bypass(op)
            elif CONST in kinds:
                for o in op.outvars:
                    cls[o] = CONST
                if self._structurally_zero(op):
                    self.zero.update(op.outvars)
            else:
                for o in op.outvars:
                    cls[o] = STATIC

    def _killed(self, op, ins: Sequence[int]) -> bool:
        if op.name in KILLING:
            return any(self.cls[v] == CONST and self.is_zero(v) for v in ins)
        if op.name == "select_n" and len(op.invars) > 1:
            cases = op.invars[1:]
            return any(self.cls.get(c) == CONST for c in cases) and all(
                literal_zero(c) or self.is_zero(c) or self._static_zero(c) for c in cases)
        return False

    def _static_zero(self, x: Any) -> bool:
        """A static value that is all zeros (``jnp.zeros_like`` of a removed value)."""
        if is_literal(x) or self.cls.get(x) != STATIC or x in self.leaf_index:
            return False
        if is_extended(self.p.avals[x].dtype):
            return False
        return not np.any(self.value(x))

    def _structurally_zero(self, op) -> bool:
        """Whether a constant operation's result is exactly zero without evaluating it.

        Products with a zero factor count as zero (the other factor taken finite, as for the
        kills), so do quotients with a zero numerator."""
        ins = op.invars
        zero = [(not is_literal(v) and v in self.zero) or literal_zero(v) for v in ins]
        name = op.name
        if name in ZERO_UNARY:
            return bool(ins) and zero[0] and all(zero)
        if name in KILLING:
            return any(zero)
        if name == "div":
            return zero[0]
        if name in ZERO_NARY or name == "pad":
            return all(zero)
        if name == "select_n":
            return all(zero[1:])
        return False
