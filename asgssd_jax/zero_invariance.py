"""Zero-invariance of candidate removal structures.

A segment is a removal structure only if, with its group at zero, its output no longer depends
on its input and is finite: only then is "the group is zero" the same as "the structure is
gone". Two checks, both on the segment's own operations (and the static computations that feed
them, e.g. a weight-normalised kernel ``g * v / ||v||``):

* symbolic: constant propagation of zeros (:func:`propagate_zeros`) from the group's leaves
  through the segment proves that every output is data-independent (a zero operand of a
  product or contraction against data gives exact zeros);
* numerical: every data-independent value of the zeroed structure that is not an exact zero is
  evaluated (constant folding: a softmax of zero scores, ``sigmoid(0)``, a weight-normalised
  kernel's ``0/0``); none may be NaN and the outputs must be finite.

Data values never need evaluating, so the cost is O(ops of the segment and its static cone) on
tensors of the structure's own sizes. Where a constant cannot be computed (an abstract PRNG
key), the segment is instead evaluated on two random draws of its inputs; its outputs must be
finite and identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from asgssd_jax.primitives import ZERO_KILLING, ZERO_PRESERVING
from asgssd_jax.trace import Program

__all__ = ["CONST", "DATA", "ZERO", "check_zero_invariance", "propagate_zeros"]

#: Lattice of :func:`propagate_zeros`: all-zero, data-independent, data-dependent.
ZERO, CONST, DATA = 0, 1, 2

# Operands that carry values (the others are indices or predicates).
_VALUE_OPERANDS = {"select_n": slice(1, None), "dynamic_slice": slice(0, 1),
                   "gather": slice(0, 1), "dynamic_update_slice": slice(0, 2)}


def _literal_kind(x: Any) -> int:
    return ZERO if np.all(np.asarray(x.val) == 0) else CONST


def _out_kind(op, ins: list[int]) -> int:
    name = op.name
    # against data (finite, as in the full network) a zero operand gives exact zeros; against a
    # constant the product is evaluated (0 * inf is NaN)
    if name in ZERO_KILLING and ZERO in ins[:2] and DATA in ins[:2]:
        return ZERO
    if name == "div" and ins[0] == ZERO and ins[1] == DATA:
        return ZERO
    values = ins[_VALUE_OPERANDS.get(name, slice(None))]
    preserving = name in ZERO_PRESERVING and (name != "integer_pow" or op.params["y"] > 0)
    if preserving and values and all(k == ZERO for k in values):
        return ZERO
    return DATA if DATA in ins else CONST


def propagate_zeros(program: Program, ops: Sequence[int], kinds: dict[int, int]) -> dict[int, int]:
    """Kinds (``ZERO``/``CONST``/``DATA``) of every value ``ops`` compute, in program order.

    ``kinds`` gives the kind of the values the ops read from outside (variables not in it count
    as ``CONST``); it is extended in place and returned.
    """
    for i in ops:
        op = program.ops[i]
        ins = [_literal_kind(x) if isinstance(x, jex_core.Literal) else kinds.get(x, CONST)
               for x in op.invars]
        k = _out_kind(op, ins)
        for o in op.outvars:
            kinds[o] = k
    return kinds


def _static_cone(program: Program, ops: Sequence[int], known: set[int]) -> list[int]:
    """The static operations whose results ``ops`` read, in program order."""
    cone: set[int] = set()
    stack = [x for i in ops for x in program.ops[i].invars
             if isinstance(x, int) and x not in program.data]
    seen: set[int] = set()
    while stack:
        x = stack.pop()
        if x in seen or x in known:
            continue
        seen.add(x)
        j = program.producer.get(x)
        if j is None or j in cone:
            continue
        cone.add(j)
        stack.extend(y for y in program.ops[j].invars if isinstance(y, int))
    return sorted(cone)


def _draw(aval, key) -> Any:
    dtype = aval.dtype
    if jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.complexfloating):
        return jax.random.normal(key, aval.shape, dtype)
    if jnp.issubdtype(dtype, jnp.integer):
        return jax.random.randint(key, aval.shape, 0, 2, dtype)
    if dtype == jnp.bool_:
        return jax.random.bernoulli(key, 0.5, aval.shape)
    return None  # PRNG keys and other extended dtypes: no numerical check


def _leaf_value(leaf: Any, aval) -> Any:
    if isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float, bool, complex)):
        return leaf
    # abstract variables (jax.eval_shape): ones are finite and positive (safe as a variance)
    if jax.dtypes.issubdtype(aval.dtype, jax.dtypes.extended):
        return None
    return jnp.ones(aval.shape, aval.dtype)


def check_zero_invariance(
    program: Program,
    ops: Sequence[int],
    group_leaves: Sequence[int],
    leaves: Sequence[Any] | None,
    seed: int = 0,
    zero_vars: Sequence[int] = (),
) -> str | None:
    """Why the structure made of ``ops`` is not zero-invariant, or None when it is.

    Args:
      program: the flat program.
      ops: the data operations of the candidate segment, in program order.
      group_leaves: indices of the variables leaves of its group (set to zero).
      leaves: the variables leaves (arrays or ``jax.ShapeDtypeStruct``); None means abstract.
      seed: seed of the random draws.
      zero_vars: further static variables set to zero: the slices of leaves that belong to the
        group (the results of the ``slice`` ops that read them).
    """
    data = program.data
    own = set(ops)
    outputs_of = {o for i in ops for o in program.ops[i].outvars}
    inputs = sorted({x for i in ops for x in program.ops[i].invars
                     if isinstance(x, int) and x in data and x not in outputs_of})
    program_outs = {x for x in program.outvars if isinstance(x, int)}
    outputs = sorted(o for o in outputs_of
                     if o in program_outs
                     or any(c not in own for c in program.consumers.get(o, ())))
    zeroed = {program.leaf_vars[i] for i in group_leaves} | set(zero_vars)
    known = set(program.leaf_vars) | set(program.consts) | set(inputs) | zeroed
    cone = _static_cone(program, ops, known)

    kinds = {v: (ZERO if v in zeroed else CONST) for v in program.leaf_vars}
    kinds.update({v: ZERO for v in zeroed})
    kinds.update({x: DATA for x in inputs})
    folded = _fold(program, [*cone, *ops], dict(kinds), zeroed, leaves)
    if folded is None:  # a constant could not be computed (e.g. an abstract PRNG key)
        kinds = propagate_zeros(program, [*cone, *ops], kinds)
        reason = _evaluate(program, ops, cone, inputs, outputs, zeroed, leaves, seed)
        depends = any(kinds[o] == DATA for o in outputs)
        return _DEPENDS if reason is None and depends else reason
    kinds, derived, values, read = folded
    if any(_has_nan(values[x]) for x in read if x in derived) or any(
            o in values and not _finite(values[o]) for o in outputs):
        return _NOT_FINITE
    return _DEPENDS if any(kinds[o] == DATA for o in outputs) else None


_DEPENDS = "its output still depends on its input with the group at zero"
_NOT_FINITE = "its output is not finite (NaN or Inf) with the group at zero"


def _inexact(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return jnp.issubdtype(np.result_type(x) if dtype is None else dtype, jnp.inexact)


def _has_nan(x: Any) -> bool:
    return _inexact(x) and bool(jnp.isnan(x).any())


def _finite(x: Any) -> bool:
    return not _inexact(x) or bool(jnp.isfinite(x).all())


def _fold(program: Program, ops: Sequence[int], kinds: dict[int, int], zeroed: set[int],
          leaves: Sequence[Any] | None):
    """:func:`propagate_zeros` that also evaluates (eagerly) every data-independent value not
    known to be exactly zero, so that a zero times a finite constant is known to be zero.

    Returns the kinds, the zero-derived variables, the values computed and the computed values
    that data operations read; None when a leaf value is unavailable.
    """
    leaf_ids = {v: i for i, v in enumerate(program.leaf_vars)}
    values: dict[int, Any] = {}

    def value(x):
        if isinstance(x, jex_core.Literal):
            return x.val
        if x in values:
            return values[x]
        aval = program.avals[x]
        if kinds.get(x, CONST) == ZERO:
            v = jnp.zeros(aval.shape, aval.dtype)
        elif x in leaf_ids:
            v = _leaf_value(None if leaves is None else leaves[leaf_ids[x]], aval)
        else:
            v = program.consts.get(x)
        if v is None:
            raise LookupError(x)
        values[x] = v
        return v

    finite: dict[int, bool] = {}

    def finite_const(x) -> bool:
        if isinstance(x, jex_core.Literal):
            return _finite(x.val)
        if x not in finite:
            finite[x] = _finite(value(x))
        return finite[x]

    derived = set(zeroed)
    read: set[int] = set()
    try:
        for i in ops:
            op = program.ops[i]
            if any(isinstance(x, int) and x in derived for x in op.invars):
                derived.update(op.outvars)
            ins = [_literal_kind(x) if isinstance(x, jex_core.Literal) else kinds.get(x, CONST)
                   for x in op.invars]
            k = _out_kind(op, ins)
            if (k == CONST and op.name in ZERO_KILLING and ZERO in ins[:2]
                    and all(finite_const(x) for x, kx in zip(op.invars[:2], ins[:2])
                            if kx == CONST)):
                k = ZERO  # zero times a finite constant
            for o in op.outvars:
                kinds[o] = k
            if k != CONST:  # data (not computable) or exact zeros
                read.update(x for x, kx in zip(op.invars, ins)
                            if isinstance(x, int) and kx == CONST)
                continue
            outs = op.primitive.bind(*[value(x) for x in op.invars], **op.params)
            values.update(zip(op.outvars, outs if op.primitive.multiple_results else [outs]))
    except LookupError:
        return None
    return kinds, derived, values, read


def _evaluate(program: Program, ops, cone, inputs, outputs, zeroed, leaves, seed) -> str | None:
    """Runs the zeroed structure on two random draws of its inputs (eagerly, op by op)."""
    leaf_ids = {v: i for i, v in enumerate(program.leaf_vars)}
    env: dict[int, Any] = {}
    for j in sorted({x for i in [*cone, *ops] for x in program.ops[i].invars
                     if isinstance(x, int) and x in leaf_ids}):
        aval = program.avals[j]
        if j in zeroed:
            env[j] = jnp.zeros(aval.shape, aval.dtype)
            continue
        value = _leaf_value(None if leaves is None else leaves[leaf_ids[j]], aval)
        if value is None:
            return None
        env[j] = value
    env.update({v: c for v, c in program.consts.items()})
    for v in zeroed:  # zeroed slices of leaves
        env[v] = jnp.zeros(program.avals[v].shape, program.avals[v].dtype)
    results = []
    for draw in range(2):
        keys = jax.random.split(jax.random.key(seed + draw), max(len(inputs), 1))
        run = dict(env)
        for x, key in zip(inputs, keys):
            value = _draw(program.avals[x], key)
            if value is None:
                return None
            run[x] = value
        for i in [*cone, *ops]:
            op = program.ops[i]
            ins = [x.val if isinstance(x, jex_core.Literal) else run[x] for x in op.invars]
            outs = op.primitive.bind(*ins, **op.params)
            run.update(zip(op.outvars, outs if op.primitive.multiple_results else [outs]))
        results.append([np.asarray(run[o]) for o in outputs])
    for a, b in zip(*results):
        if jnp.issubdtype(a.dtype, jnp.inexact) and not np.all(np.isfinite(a)):
            return _NOT_FINITE
        if not np.array_equal(a, b):
            return _DEPENDS
    return None
