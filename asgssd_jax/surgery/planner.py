"""The analysis of one traced program with the zeroed values: its :class:`ModePlan`.

:class:`Planner` runs the steps of Section 3.3 in order, each in its own module: constant
propagation removes the zero structures (:mod:`.remove`), joints left with one input are
bypassed and dead code is found (:mod:`.erase`), concat consumers are sliced
(:mod:`.affiliated`), constants are folded (:mod:`.fold`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from asgssd_jax.surgery.affiliated import Affiliated
from asgssd_jax.surgery.erase import Erasure
from asgssd_jax.surgery.fold import Folding
from asgssd_jax.surgery.plan import ModePlan
from asgssd_jax.surgery.remove import CONST, STATIC, Removal, is_literal
from asgssd_jax.trace import Program, slice_units

__all__ = ["Planner", "plan_program", "signature"]


def signature(program: Program) -> str:
    """A hash of the program's structure (operations and how they connect)."""
    h = hashlib.sha1()
    h.update(repr((len(program.leaf_vars), len(program.arg_vars), len(program.consts))).encode())
    for op in program.ops:
        ins = tuple(-1 if is_literal(v) else v for v in op.invars)
        h.update(repr((op.name, ins, op.outvars)).encode())
    h.update(repr(tuple(-1 if is_literal(v) else v for v in program.outvars)).encode())
    return h.hexdigest()


class Planner(Removal, Erasure, Affiliated, Folding):
    """State shared by the steps; each step is a method of its module's mixin."""

    def __init__(self, program: Program, leaf_values: Sequence[Any], removed: set[Any],
                 output_kinds: Sequence[tuple[str, str | None]], kept_state: set[str] | None,
                 twin: Program | None = None):
        self.p = program
        self.twin = twin  # the same program traced at another batch size (None: shapes fixed)
        self.leaf_values = leaf_values
        self.removed = removed
        self.output_kinds = output_kinds  # per flat output: ("main", None) | ("state", path)
        self.kept_state = kept_state  # None: keep every state output
        self.cls: dict[int, int] = {}
        self.zero: set[int] = set()  # constant vars known to be exactly 0
        self.vals: dict[int, Any] = {}
        self.killed: set[int] = set()  # ops whose outputs are zero constants
        self.alias: dict[int, tuple[int, bool]] = {}
        self.leaf_index = {v: i for i, v in enumerate(program.leaf_vars)}
        # static ``slice`` ops reading one entry of a leaf: (leaf, axis, index) by op
        self.slice_units = slice_units(program)
        self.removed_slices = {i for i, u in self.slice_units.items() if u in removed}

    def run(self) -> None:
        self.classify()  # step 1 (with the bypass of step 3)
        self.liveness()  # step 3: isolated vertices
        self.slice_concats()  # step 2
        self.requirements()  # step 2: static operands sliced back to the leaves
        self.constants()  # constant folding

    def mode_plan(self, kwargs: Mapping[str, Any], dynamic: Sequence[str],
                  mutable: Sequence[str]) -> ModePlan:
        p = self.p
        ops = tuple(sorted(self.live))
        state_outputs = {pos: self.output_kinds[pos][1] for pos in self.kept_outputs
                         if self.output_kinds[pos][0] == "state"}
        state_masks: dict[int, Any] = {}
        for pos in state_outputs:
            x = p.outvars[pos]
            if not isinstance(x, int):
                state_masks[pos] = None
            elif x in self.leaf_index and self.cls[x] == STATIC:
                state_masks[pos] = "leaf"
            else:
                state_masks[pos] = self.masks.get(x)
        leaves = sorted({self.leaf_index[x] for i in ops if i not in self.alias
                         for k, x in enumerate(p.ops[i].invars)
                         if isinstance(x, int) and x in self.leaf_index
                         and self.cls[x] != CONST and k not in self.dropped.get(i, ())}
                        | {self.leaf_index[p.outvars[pos]] for pos in self.kept_outputs
                           if isinstance(p.outvars[pos], int) and p.outvars[pos] in self.leaf_index
                           and self.cls[p.outvars[pos]] != CONST})
        return ModePlan(
            kwargs=dict(kwargs), dynamic=tuple(sorted(dynamic)), mutable=tuple(mutable),
            signature=signature(p), num_ops=len(p.ops), ops=ops, alias=dict(self.alias),
            dropped={i: tuple(s) for i, s in self.dropped.items() if i not in self.alias},
            masks=dict(self.masks), gathers=dict(self.gathers), consts=self.consts,
            computed=self.computed, const_inputs=self.const_inputs,
            offsets=dict(self.offsets),
            outputs=tuple(self.kept_outputs),
            main_outputs=tuple(i for i, (k, _) in enumerate(self.output_kinds) if k == "main"),
            state_outputs=state_outputs, state_masks=state_masks,
            leaf_slices=dict(self.leaf_slices), leaf_uses=dict(self.leaf_uses),
            leaves=tuple(leaves))


def plan_program(program: Program, leaf_values: Sequence[Any], removed: set[Any],
                 output_kinds: Sequence[tuple[str, str | None]], kept_state: set[str] | None,
                 kwargs: Mapping[str, Any], dynamic: Sequence[str], mutable: Sequence[str],
                 twin: Program | None = None) -> ModePlan:
    """The :class:`ModePlan` of ``program`` with ``removed`` at zero: leaf indices, and
    ``(leaf, axis, index)`` slices of leaves (read by static ``slice`` ops)."""
    planner = Planner(program, leaf_values, removed, output_kinds, kept_state, twin)
    planner.run()
    return planner.mode_plan(kwargs, dynamic, mutable)
