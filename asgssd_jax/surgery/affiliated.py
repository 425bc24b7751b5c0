"""Step 2 of Section 3.3: remove the structures affiliated with the removed vertices.

A concat operand that became constant is dropped when its channels trace (as in
:func:`~asgssd_jax.search_space.trace_channels`) through per-channel operations to the
contractions that consume them; every value on the way, and the static operands there
(BatchNorm/LayerNorm parameters, conv and dense kernels, flattened features), is sliced
(Figure 4b: the columns of K6). What the dropped (constant) channels contributed to each
contraction is folded into an offset added to its result (nothing when they were zero all the
way, as in Figure 4); for 16-bit floats the contraction then accumulates in float32 and the
offset is added before the one rounding, as the full network rounds once. A concat left with
one operand is the identity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from asgssd_jax.primitives import ELEMENTWISE
from asgssd_jax.search_space import _shape_of, follow_channels
from asgssd_jax.surgery.fold import compact
from asgssd_jax.surgery.plan import Mask, SurgeryError, mask_key
from asgssd_jax.surgery.remove import CONST, DATA, FAST_COMPILE, STATIC, is_literal
from asgssd_jax.trace import Program

__all__ = ["Affiliated", "backward", "low_precision"]

#: Data operations that keep zero channels zero whatever their static operands.
KEEPS_ZERO = frozenset(
    """concatenate reshape broadcast_in_dim transpose squeeze convert_element_type copy neg mul
    reduce_sum reduce_window_sum rev""".split()
)

FLEX = object()  # a use that takes whatever slice its value has


class _Take(tuple):
    """A use that reads one entry ``index`` along ``axis`` (of ``size``) of a value: a static
    ``slice`` of one layer of a stacked leaf. Uses that all take entries along one axis let the
    value keep only the entries taken (the removed layers' are dropped)."""

    axis = property(lambda self: self[0])
    size = property(lambda self: self[1])
    index = property(lambda self: self[2])


def low_precision(dtype) -> bool:
    """16-bit floats, whose contractions accumulate in float32 and round once."""
    return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32


def accumulating_params(op, dtype, params: dict | None = None) -> dict:
    """``op``'s parameters (or ``params``) with float32 accumulation left unrounded (16-bit
    results)."""
    params = dict(op.params if params is None else params)
    if low_precision(dtype) and op.name in ("dot_general", "conv_general_dilated"):
        params["preferred_element_type"] = np.dtype(np.float32)
    return params


class Affiliated:
    """Concat slicing and static-operand slicing (a mixin of :class:`~.planner.Planner`)."""

    def slice_concats(self) -> None:
        """Drops constant concat operands whose channels trace to contractions.

        The dropped channels are constants (they depend on the removed operand and per-channel
        static values only), so each contraction that consumed them gets their contribution
        as a folded constant added to its result (zero in the common case of no affine
        operation in between)."""
        p, cls = self.p, self.cls
        data = frozenset(v for v, c in cls.items() if c == DATA)
        self.data = data
        main_outs = {p.outvars[pos] for pos in self.kept_outputs
                     if self.output_kinds[pos][0] == "main" and isinstance(p.outvars[pos], int)}
        removed_pos: dict[int, tuple[int, np.ndarray]] = {}  # var -> (axis, removed bool mask)
        self.dropped: dict[int, list[int]] = {}
        sites: dict[int, int] = {}  # contraction op -> operand slot holding the channels
        path_ops: set[int] = set()
        forward = {i: src for i, (src, _) in self.alias.items()}  # negation keeps channels
        for i in sorted(self.live):
            op = p.ops[i]
            if op.name != "concatenate" or cls[op.outvars[0]] != DATA:
                continue
            for k, x in enumerate(op.invars):
                if is_literal(x) or cls[x] != CONST:
                    continue
                found = follow_channels(p, i, k, data=data, outputs=main_outs,
                                        skip=lambda j: j not in self.live, forward=forward)
                if found is None:
                    continue
                tracked, found_sites = found
                if any(v in removed_pos and removed_pos[v][0] != s.axis
                       for v, s in tracked.items()):
                    continue  # inconsistent with a slice already chosen: keep the constant
                if any(sites.get(c.op, c.operand) != c.operand for c in found_sites):
                    continue
                for v, s in tracked.items():
                    size = p.shape(v)[s.axis]
                    idx = s.indices(size)
                    if v in removed_pos:
                        removed_pos[v] = (s.axis, removed_pos[v][1] | idx)
                    else:
                        removed_pos[v] = (s.axis, idx)
                    path_ops.add(p.producer[v])
                for c in found_sites:
                    sites[c.op] = c.operand
                self.dropped.setdefault(i, []).append(k)
        self.masks: dict[int, Mask] = {}
        for v, (axis, rem) in removed_pos.items():
            self.masks[v] = (axis, len(rem), np.flatnonzero(~rem).astype(np.int32))
        zeros = all(self.is_zero(p.ops[i].invars[k]) for i, ks in self.dropped.items() for k in ks)
        if zeros and all(i in self.alias or self._keeps_zero(p.ops[i]) for i in path_ops):
            self.offsets = {}  # zero channels all the way (Figure 4): nothing to fold
        else:
            self.offsets = self._site_offsets(sorted(path_ops), sites, removed_pos)
        # a concat left with a single operand is the identity
        for i, slots in self.dropped.items():
            op = p.ops[i]
            rest = [x for k, x in enumerate(op.invars) if k not in slots]
            if len(rest) == 1 and isinstance(rest[0], int) and cls[rest[0]] == DATA:
                self.alias[i] = (rest[0], False)

    def _keeps_zero(self, op) -> bool:
        if op.name in KEEPS_ZERO:
            return True
        # relu and friends: max/min against a literal zero
        return op.name in ("max", "min") and all(
            (is_literal(x) and not np.any(x.val)) or self.cls.get(x) == DATA
            for x in op.invars)

    def _site_offsets(self, path_ops, sites, removed_pos) -> dict[int, np.ndarray]:
        """What the dropped channels contribute to each contraction (non-zero ones only)."""
        if not sites:
            return {}
        p, cls = self.p, self.cls
        produced = {o for i in path_ops for o in p.ops[i].outvars}
        external = sorted({x for i in list(path_ops) + list(sites) for x in p.ops[i].invars
                           if isinstance(x, int) and x not in produced})
        constants = [x for x in external if cls[x] != DATA]
        known = dict(zip(constants, self.values(constants)))
        for x in external:  # other data: its channels are kept, so any value does
            if cls[x] == DATA:
                known[x] = np.zeros(p.avals[x].shape, p.avals[x].dtype)
        names = list(known)
        bypass = {i: a for i, a in self.alias.items() if p.ops[i].name != "concatenate"}
        order = sorted(sites)

        def replay(*vals):
            env = dict(zip(names, vals))
            for i in path_ops:
                op = p.ops[i]
                if i in bypass:
                    src, neg = bypass[i]
                    env[op.outvars[0]] = -env[src] if neg else env[src]
                    continue
                ins = [v.val if is_literal(v) else env[v] for v in op.invars]
                res = op.primitive.bind(*ins, **op.params)
                env.update(zip(op.outvars, res if op.primitive.multiple_results else [res]))
            results = []
            for s in order:
                op = p.ops[s]
                k = sites[s]
                x = op.invars[k]
                axis, rem = removed_pos[x]
                shape = [1] * len(p.shape(x))
                shape[axis] = len(rem)
                only_removed = jnp.where(jnp.asarray(rem.reshape(shape)), env[x], 0)
                ins = [v.val if is_literal(v) else env[v] for v in op.invars]
                ins[k] = only_removed.astype(env[x].dtype)
                out_dtype = p.avals[op.outvars[0]].dtype
                results.append(op.primitive.bind(*ins, **accumulating_params(op, out_dtype)))
            return results

        results = jax.jit(replay, compiler_options=FAST_COMPILE)(*[known[x] for x in names])
        offsets = {}
        for s, r in zip(order, results):
            r = np.asarray(r)
            if np.any(r):
                offsets[s] = compact(r)
                if not self.bakeable(p.ops[s].outvars[0], offsets[s]):
                    raise SurgeryError(
                        f"the channels removed from {p.ops[s].name_stack or p.ops[s].name!r} "
                        "contribute a constant that varies along an axis merged with the batch; "
                        "keep the group that feeds them (remove another)")
        return offsets

    # -- 4. slicing requirements on static operands, propagated back to the leaves ----------
    def requirements(self) -> None:
        p, cls, masks = self.p, self.cls, self.masks
        uses: dict[int, list[tuple[tuple[int, int], Mask | None]]] = {}
        self.gathers: dict[tuple[int, int], Mask] = {}

        def add_use(x, key, req):
            if isinstance(x, int) and cls[x] != DATA:
                uses.setdefault(x, []).append((key, req))

        def real(us):
            return [(k, r) for k, r in us if r is not FLEX]

        def taken(us) -> Mask | None:
            """The entries kept when every use takes entries along one axis, else None (the
            value stays whole; its other sliced uses gather)."""
            takes = [r for _, r in us if isinstance(r, _Take)]
            if not takes:
                return None
            others = [(k, r) for k, r in us if not isinstance(r, _Take)]
            if others or len({(t.axis, t.size) for t in takes}) != 1:
                for key, r in others:
                    if r is not None:
                        self.gathers[key] = r
                return None
            keep = sorted({t.index for t in takes})
            if len(keep) == takes[0].size:
                return None
            return (takes[0].axis, takes[0].size, np.asarray(keep, np.int32))

        live_static = []
        for i in sorted(self.live):
            op = p.ops[i]
            if i in self.alias:
                continue
            if op.outvars and cls[op.outvars[0]] == STATIC:
                live_static.append(i)
                continue
            reqs = self._data_op_requirements(op)
            drop = self.dropped.get(i, ())
            for k, x in enumerate(op.invars):
                if k not in drop:
                    add_use(x, (i, k), reqs.get(k))
        for pos in self.kept_outputs:
            # the result must be whole; mutable state takes the shape of its (kept) leaf
            state = self.output_kinds[pos][0] == "state"
            add_use(p.outvars[pos], (-1, pos), FLEX if state else None)
        self.var_mask: dict[int, Mask] = {}

        def decide(x) -> Mask | None:
            """The slice ``x`` is produced with; uses that need another get a gather."""
            us = real(uses.get(x, []))
            if any(isinstance(r, _Take) for _, r in us):
                return taken(us)
            keys = {mask_key(r) for _, r in us}
            if keys == {None} or not us:
                return None
            if len(keys) == 1:
                return us[0][1]
            for key, r in us:
                if r is not None:
                    self.gathers[key] = r
            return None

        def fail(x):
            for key, r in real(uses.get(x, [])):
                if r is not None and not isinstance(r, _Take):
                    self.gathers[key] = r

        for i in reversed(live_static):
            op = p.ops[i]
            if len(op.outvars) != 1:
                for o in op.outvars:
                    fail(o)
                for k, x in enumerate(op.invars):
                    add_use(x, (i, k), None)
                continue
            o = op.outvars[0]
            r = decide(o)
            back = None if r is None else backward(op, p, r)
            if r is not None and back is None:
                fail(o)
                r = None
            if r is not None:
                self.var_mask[o] = r
            if r is None and i in self.slice_units:  # one layer of a stacked leaf
                _, axis, index = self.slice_units[i]
                x = op.invars[0]
                add_use(x, (i, 0), _Take((axis, p.shape(x)[axis], index)))
                continue
            for k, x in enumerate(op.invars):
                add_use(x, (i, k), None if back is None else back.get(k))
        # leaves, jaxpr constants and folded constants: no producer to push slices into
        self.leaf_slices: dict[int, Mask] = {}
        self.leaf_uses: dict[int, tuple[tuple[int, int], ...]] = {}
        self.bake: dict[int, Mask | None] = {}
        for x, us in uses.items():
            if x in self.var_mask or p.producer.get(x) in self.live:
                continue
            if x in self.leaf_index and cls[x] == STATIC:
                r = decide(x)
                li = self.leaf_index[x]
                if r is not None:
                    self.leaf_slices[li] = r
                self.leaf_uses[li] = tuple(k for k, _ in real(us))
            elif cls[x] == CONST:
                self.bake[x] = decide(x)
            else:  # jaxpr constants stay whole
                fail(x)
        for x, r in self.var_mask.items():
            masks[x] = r
        for x, r in self.bake.items():
            if r is not None:
                masks[x] = r
        for li, r in self.leaf_slices.items():
            masks[p.leaf_vars[li]] = r

    def _data_op_requirements(self, op) -> dict[int, Mask]:
        """Slices that a kept data operation needs of its non-data operands."""
        p, masks = self.p, self.masks
        tracked = [(k, masks[x]) for k, x in enumerate(op.invars)
                   if isinstance(x, int) and x in masks and self.cls[x] == DATA]
        if not tracked:
            return {}
        name = op.name
        out = op.outvars[0] if op.outvars else None
        reqs: dict[int, Mask] = {}
        if name in ELEMENTWISE and out is not None:
            axis, size, keep = masks.get(out, tracked[0][1])
            rank = len(p.shape(out))
            for k, x in enumerate(op.invars):
                if not isinstance(x, int) or self.cls[x] == DATA:
                    continue
                shp = p.shape(x)
                if len(shp) == rank and shp[axis] == size and size != 1:
                    reqs[k] = (axis, size, keep)
        elif name == "conv_general_dilated":
            dn = op.params["dimension_numbers"]
            kernel_shape = _shape_of(p, op.invars[1])
            if op.params["feature_group_count"] == 1:
                _, _, keep = tracked[0][1]
                reqs[1] = (dn.rhs_spec[1], kernel_shape[dn.rhs_spec[1]], keep)
            else:  # depthwise: the kernel's output features follow the channels
                _, _, keep = masks[out]
                reqs[1] = (dn.rhs_spec[0], kernel_shape[dn.rhs_spec[0]], keep)
        elif name == "dot_general":
            (lc, rc), _ = op.params["dimension_numbers"]
            k, (axis, size, keep) = tracked[0]
            mine, other = (lc, rc) if k == 0 else (rc, lc)
            if axis in mine:
                ax = other[list(mine).index(axis)]
                reqs[1 - k] = (ax, _shape_of(p, op.invars[1 - k])[ax], keep)
        return reqs


def backward(op, program: Program, req: Mask) -> dict[int, Mask | None] | None:
    """Slices of a static operation's operands that give its result sliced as ``req``."""
    axis, size, keep = req
    name = op.name
    out_shape = program.shape(op.outvars[0])
    ins = op.invars
    if name in ELEMENTWISE:
        res: dict[int, Mask | None] = {}
        for k, x in enumerate(ins):
            shp = _shape_of(program, x)
            if not shp:
                continue
            if len(shp) != len(out_shape):
                return None
            if shp[axis] == size:
                if is_literal(x):
                    return None
                res[k] = req
            elif shp[axis] != 1:
                return None
        return res
    if is_literal(ins[0]):
        return None if name != "broadcast_in_dim" else {}
    in_shape = program.shape(ins[0])
    if name == "reshape":
        prefix = int(np.prod(out_shape[:axis], dtype=np.int64))
        for j in range(len(in_shape)):
            if int(np.prod(in_shape[:j], dtype=np.int64)) == prefix and in_shape[j] == size:
                return {0: (j, size, keep)}
        return None
    if name == "broadcast_in_dim":
        dims = list(op.params["broadcast_dimensions"])
        if axis not in dims:
            return {}
        j = dims.index(axis)
        if in_shape[j] == size:
            return {0: (j, size, keep)}
        return {} if in_shape[j] == 1 else None
    if name == "transpose":
        return {0: (op.params["permutation"][axis], size, keep)}
    if name == "squeeze":
        dims = sorted(d % len(in_shape) for d in op.params["dimensions"])
        kept_axes = [d for d in range(len(in_shape)) if d not in dims]
        return {0: (kept_axes[axis], size, keep)}
    return None


