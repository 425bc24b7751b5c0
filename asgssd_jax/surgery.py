"""Automated sub-network construction (Section 3.3 of the paper).

``construct_subnetwork(space, variables)`` reads the zero groups from ``variables`` and returns a
:class:`SubNetwork`: a linen Module that computes exactly what the network computes with those
groups at zero, with the removed structures and everything that only served them gone.

The construction is a rewrite of the traced program, done once per mode (inference, training)
on the program of the sample the space was traced with, and expressed per operation and per
variable id so that it carries over to a re-trace at any other input shape (when a model's
program differs at batch size 1, e.g. a broadcast it skips there, both are planned):

1. **Constant propagation.** A value is *data* (depends on the input), *static* (computed from
   kept variables alone: parameters, BatchNorm statistics) or *constant* (independent of the
   input because a removed group's zero leaves reach it). A multiplication, convolution or dot
   product of data with a constant exact zero is constant zero; so a zeroed structure's output
   becomes constant (usually 0, e.g. 0.5 after a sigmoid).
2. **Bypass.** ``a + 0``, ``0 + a``, ``a - 0`` become ``a``; ``0 - a`` becomes ``-a``. A concat
   operand that became constant is dropped when its channels trace (as in
   :func:`~asgssd_jax.search_space.trace_channels`) through per-channel operations to the
   contractions that consume them; every value on the way, and the static operands there
   (BatchNorm/LayerNorm parameters, conv and dense kernels, flattened features), is sliced, and
   what the dropped (constant) channels contributed to each contraction is folded into a
   constant added to its result (nothing when they were zero all the way, as in Figure 4). A
   concat left with one operand is the identity.
3. **Constant folding and dead-code elimination.** Constants that reach a kept operation are
   evaluated once and stored (broadcast along axes where they do not vary, such as the batch);
   operations whose results no longer reach an output are dropped, and so are the variables
   that only they read.

The result keeps the original variable paths; leaves feeding sliced channels are sliced. The
exactness invariant (DESIGN.md) holds by construction: each rewrite is an identity of the
zeroed network. (A value multiplied by a removed zero is taken to be finite.)

References:
  Section 3.3 and Figure 4 of "Automated search-space generation for sub-network search within
  deep neural networks" (ASGSSD).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

from asgssd_jax.search_space import _ELEMENTWISE, SearchSpace, _shape_of, follow_channels
from asgssd_jax.trace import Program, TraceError, leaf_path, trace_program

__all__ = ["ModePlan", "SubNetwork", "SubNetworkPlan", "SurgeryError", "construct_subnetwork",
           "relative_difference"]


class SurgeryError(ValueError):
    """The sub-network cannot be built or run as asked; the message says what to do."""


DATA, STATIC, CONST = 0, 1, 2

#: Operations whose result is exactly zero when one operand is zero (other operands finite).
_KILLING = frozenset({"mul", "dot_general", "conv_general_dilated"})
#: f(0) == 0 exactly: a constant computed from known zeros by these stays a known zero.
_ZERO_UNARY = frozenset(
    """neg convert_element_type reshape broadcast_in_dim transpose squeeze reduce_sum
    reduce_window_sum copy copy_p slice rev abs sqrt sign tanh sin tan expm1 log1p erf
    reduce_precision cumsum real imag""".split()
)
_ZERO_NARY = frozenset({"add", "add_any", "sub", "max", "min", "concatenate"})


#: Data operations that keep zero channels zero whatever their static operands.
_KEEPS_ZERO = frozenset(
    """concatenate reshape broadcast_in_dim transpose squeeze convert_element_type copy neg mul
    reduce_sum reduce_window_sum rev""".split()
)
#: One-off evaluations of constants: compile fast rather than run fast.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _is_literal(x: Any) -> bool:
    return isinstance(x, jex_core.Literal)


# ----------------------------------------------------------------------------------------------
# The plan: what to do with each operation and variable of one traced program.

Mask = tuple[int, int, np.ndarray]  # (axis, original size, kept indices)


def _mask_key(m: Mask | None):
    return None if m is None else (m[0], m[1], m[2].tobytes())


def _mask_equal(a: Mask | None, b: Mask | None) -> bool:
    return _mask_key(a) == _mask_key(b)


@dataclasses.dataclass(eq=False)
class ModePlan:
    """The rewrite of the program of one mode (a set of keyword arguments of ``apply_fn``).

    Operation indices and variable ids refer to the flat :class:`~asgssd_jax.trace.Program`
    of ``apply_fn``; any re-trace with another input shape has the same ones (``signature``).
    """

    kwargs: dict[str, Any]  # keyword arguments of apply_fn (without ``mutable``)
    mutable: tuple[str, ...]  # collections traced as mutable (linen)
    signature: str  # hash of the program's structure
    num_ops: int
    ops: tuple[int, ...]  # operations to run, in program order
    alias: dict[int, tuple[int, bool]]  # op -> (var it forwards, negate)
    dropped: dict[int, tuple[int, ...]]  # concatenate op -> operand slots dropped
    masks: dict[int, Mask]  # var -> kept positions along an axis
    gathers: dict[tuple[int, int], Mask]  # (op, slot) or (-1, output position) -> slice on read
    consts: dict[int, np.ndarray]  # var -> folded constant (size-1 axes broadcast)
    offsets: dict[int, np.ndarray]  # contraction op -> folded constant added to its result
    outputs: tuple[int, ...]  # kept positions of the program's flat outputs
    main_outputs: tuple[int, ...]  # positions of the function's result (not mutable state)
    state_outputs: dict[int, str]  # kept output position -> variables path (mutable state)
    state_masks: dict[int, Any]  # kept state output -> its slice as produced ("leaf": the leaf's)
    leaf_slices: dict[int, Mask]  # leaf index -> kept positions (decided by this mode)
    leaf_uses: dict[int, tuple[tuple[int, int], ...]]  # leaf -> its (op, slot) reads
    leaves: tuple[int, ...]  # leaf indices this mode reads

    def key(self) -> tuple:
        return _kwargs_key(self.kwargs)


def _kwargs_key(kwargs: Mapping[str, Any]) -> tuple:
    items = []
    for k in sorted(kwargs):
        v = kwargs[k]
        try:
            hash(v)
        except TypeError:
            v = repr(v)
        items.append((k, v))
    return tuple(items)


@dataclasses.dataclass(eq=False)
class SubNetworkPlan:
    """Everything that defines a sub-network besides the original model code and its values.

    Attributes:
      leaf_paths, leaf_shapes, leaf_dtypes: the full network's variables (structure only).
      kept: indices of the leaves the sub-network keeps, in ``leaf_paths`` order.
      leaf_slices: kept leaf index -> (axis, size, kept indices) for sliced leaves.
      removed_groups: the zero groups of the search space that were removed.
      modes: one :class:`ModePlan` per supported set of keyword arguments.
      sample_args: shapes and dtypes of the sample input (``jax.ShapeDtypeStruct`` tree).
      unavailable: modes that could not be planned, with the reason.
    """

    leaf_paths: tuple[str, ...]
    leaf_shapes: tuple[tuple[int, ...], ...]
    leaf_dtypes: tuple[str, ...]
    kept: tuple[int, ...]
    leaf_slices: dict[int, Mask]
    removed_groups: tuple[int, ...]
    removed_paths: tuple[str, ...]
    modes: tuple[ModePlan, ...]
    sample_args: Any
    unavailable: dict[tuple, str] = dataclasses.field(default_factory=dict)
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    # -- structure -------------------------------------------------------------------------------
    @property
    def kept_paths(self) -> tuple[str, ...]:
        return tuple(self.leaf_paths[i] for i in self.kept)

    def kept_shape(self, i: int) -> tuple[int, ...]:
        shape = list(self.leaf_shapes[i])
        m = self.leaf_slices.get(i)
        if m is not None:
            shape[m[0]] = len(m[2])
        return tuple(shape)

    def full_spec(self) -> Any:
        """The full network's variables as a tree of ``jax.ShapeDtypeStruct``."""
        leaves = [jax.ShapeDtypeStruct(s, np.dtype(d))
                  for s, d in zip(self.leaf_shapes, self.leaf_dtypes)]
        return _unflatten_paths(self.leaf_paths, leaves)

    def modes_for(self, kwargs: Mapping[str, Any]) -> list[ModePlan]:
        """The plans made for these keyword arguments (one per program structure)."""
        key = _kwargs_key(kwargs)
        found = [m for m in self.modes if m.key() == key]
        if found:
            return found
        if key in self.unavailable:
            raise SurgeryError(f"the sub-network cannot run with {dict(kwargs)}: "
                               f"{self.unavailable[key]}")
        known = ", ".join(sorted({str(m.kwargs) for m in self.modes}))
        raise SurgeryError(
            f"the sub-network was planned for the keyword arguments {known}, not {dict(kwargs)}; "
            "pass modes=[...] to construct_subnetwork to plan others")

    # -- serialisation (orbax checkpoints: JSON metadata plus arrays) -------------------------
    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(metadata, arrays)``: a JSON-able description and the arrays it names."""
        arrays: dict[str, np.ndarray] = {"none": np.zeros((), np.int32)}

        def mask(name: str, m: Mask) -> list:
            arrays[name] = np.asarray(m[2])
            return [int(m[0]), int(m[1]), name]

        modes = []
        for k, m in enumerate(self.modes):
            try:
                json.dumps(m.kwargs)
            except TypeError as e:
                raise SurgeryError(f"keyword arguments {m.kwargs} cannot be saved: {e}") from e
            for v, c in m.consts.items():
                arrays[f"m{k}_const_{v}"] = np.asarray(c)
            for i, c in m.offsets.items():
                arrays[f"m{k}_offset_{i}"] = np.asarray(c)
            modes.append({
                "kwargs": m.kwargs, "mutable": list(m.mutable), "signature": m.signature,
                "num_ops": m.num_ops, "ops": list(m.ops),
                "alias": [[i, s, bool(n)] for i, (s, n) in m.alias.items()],
                "dropped": [[i, list(s)] for i, s in m.dropped.items()],
                "masks": [[v, *mask(f"m{k}_mask_{v}", r)] for v, r in m.masks.items()],
                "gathers": [[i, s, *mask(f"m{k}_gather_{i}_{s}", r)]
                            for (i, s), r in m.gathers.items()],
                "consts": [[v, f"m{k}_const_{v}"] for v in m.consts],
                "offsets": [[i, f"m{k}_offset_{i}"] for i in m.offsets],
                "outputs": list(m.outputs), "main_outputs": list(m.main_outputs),
                "state_outputs": [[p, path] for p, path in m.state_outputs.items()],
                "leaves": list(m.leaves),
            })
        args, tree = jax.tree_util.tree_flatten(self.sample_args)
        meta = {
            "format": 1,
            "leaf_paths": list(self.leaf_paths),
            "leaf_shapes": [list(s) for s in self.leaf_shapes],
            "leaf_dtypes": list(self.leaf_dtypes),
            "kept": list(self.kept),
            "leaf_slices": [[i, *mask(f"leaf_{i}", r)] for i, r in self.leaf_slices.items()],
            "removed_groups": list(self.removed_groups),
            "removed_paths": list(self.removed_paths),
            "sample_args": ([[list(a.shape), str(a.dtype)] for a in args]
                            if tree == jax.tree_util.tree_structure(tuple(args)) else None),
            "modes": modes,
            "unavailable": [[[list(kv) for kv in key], why] for key, why in
                            self.unavailable.items()],
        }
        json.dumps(meta)
        return meta, arrays

    @classmethod
    def from_state(cls, meta: Mapping[str, Any], arrays: Mapping[str, Any]) -> SubNetworkPlan:
        """Inverse of :meth:`to_state`."""
        if meta.get("format") != 1:
            raise SurgeryError(f"unknown sub-network plan format {meta.get('format')!r}")

        def mask(axis, size, name) -> Mask:
            return (int(axis), int(size), np.asarray(arrays[name], np.int32))

        modes = []
        for m in meta["modes"]:
            modes.append(ModePlan(
                kwargs=dict(m["kwargs"]), mutable=tuple(m["mutable"]), signature=m["signature"],
                num_ops=int(m["num_ops"]), ops=tuple(m["ops"]),
                alias={int(i): (int(s), bool(n)) for i, s, n in m["alias"]},
                dropped={int(i): tuple(s) for i, s in m["dropped"]},
                masks={int(v): mask(a, z, n) for v, a, z, n in m["masks"]},
                gathers={(int(i), int(s)): mask(a, z, n) for i, s, a, z, n in m["gathers"]},
                consts={int(v): np.asarray(arrays[n]) for v, n in m["consts"]},
                offsets={int(i): np.asarray(arrays[n]) for i, n in m["offsets"]},
                outputs=tuple(m["outputs"]), main_outputs=tuple(m["main_outputs"]),
                state_outputs={int(p): path for p, path in m["state_outputs"]},
                state_masks={}, leaf_slices={}, leaf_uses={}, leaves=tuple(m["leaves"])))
        sample = meta.get("sample_args")
        return cls(
            leaf_paths=tuple(meta["leaf_paths"]),
            leaf_shapes=tuple(tuple(s) for s in meta["leaf_shapes"]),
            leaf_dtypes=tuple(meta["leaf_dtypes"]),
            kept=tuple(meta["kept"]),
            leaf_slices={int(i): mask(a, z, n) for i, a, z, n in meta["leaf_slices"]},
            removed_groups=tuple(meta["removed_groups"]),
            removed_paths=tuple(meta["removed_paths"]),
            modes=tuple(modes),
            sample_args=(None if sample is None else
                         tuple(jax.ShapeDtypeStruct(tuple(s), np.dtype(d)) for s, d in sample)),
            unavailable={tuple(tuple(kv) for kv in key): why
                         for key, why in meta["unavailable"]})

    # -- running -----------------------------------------------------------------------------
    def runner(self, apply_fn: Callable[..., Any], kwargs: Mapping[str, Any],
               args: Sequence[Any]) -> _Runner:
        """The rewritten program for ``kwargs`` and inputs shaped like ``args`` (cached)."""
        leaves, tree = jax.tree_util.tree_flatten(args)
        specs = tuple(jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)) for a in leaves)
        key = (id(apply_fn), _kwargs_key(kwargs), tree, tuple((s.shape, s.dtype) for s in specs))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        candidates = self.modes_for(kwargs)
        arg_specs = jax.tree_util.tree_unflatten(tree, specs)
        call_kwargs = dict(kwargs)
        if candidates[0].mutable:
            call_kwargs["mutable"] = list(candidates[0].mutable)
        try:
            program, paths, _ = trace_program(apply_fn, self.full_spec(), *arg_specs,
                                              **call_kwargs)
        except TraceError as e:
            raise SurgeryError(f"the original apply_fn could not be traced for the sub-network: "
                               f"{e}") from e
        if tuple(paths) != self.leaf_paths:
            raise SurgeryError("apply_fn's variables differ from the ones the sub-network was "
                               "built from; pass the original model's apply")
        sig = _signature(program)
        matching = [m for m in candidates if m.signature == sig and m.num_ops == len(program.ops)]
        if not matching:
            shapes = ", ".join(str(s.shape) for s in specs)
            planned = " or ".join(str(m.num_ops) for m in candidates)
            raise SurgeryError(
                f"the program of apply_fn for inputs of shape {shapes} differs from the ones the "
                f"sub-network was planned on ({len(program.ops)} vs {planned} operations). Use "
                "the same model definition (and configuration) the sub-network was built from; "
                "a model whose operations change with the input shape beyond batch size 1 vs "
                "larger is not supported")
        run = _Runner(program, matching[0], self)
        self._cache[key] = run
        return run


def _unflatten_paths(paths: Sequence[str], leaves: Sequence[Any]) -> dict:
    out: dict = {}
    for p, leaf in zip(paths, leaves):
        node = out
        parts = p.split("/")
        for k in parts[:-1]:
            node = node.setdefault(k, {})
        node[parts[-1]] = leaf
    return out


def _signature(program: Program) -> str:
    h = hashlib.sha1()
    h.update(repr((len(program.leaf_vars), len(program.arg_vars), len(program.consts))).encode())
    for op in program.ops:
        ins = tuple(-1 if _is_literal(v) else v for v in op.invars)
        h.update(repr((op.name, ins, op.outvars)).encode())
    h.update(repr(tuple(-1 if _is_literal(v) else v for v in program.outvars)).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Running a plan on a (re-)traced program.


class _Runner:
    """Evaluates the rewritten program: re-binds the kept primitives with rewritten shapes."""

    def __init__(self, program: Program, mode: ModePlan, plan: SubNetworkPlan):
        self.program = program
        self.mode = mode
        self.out_tree = program.out_tree
        masks = mode.masks

        def new_shape(v: int) -> tuple:
            shape = list(program.shape(v))
            m = masks.get(v)
            if m is not None:
                axis, size, keep = m
                if shape[axis] != size:
                    raise SurgeryError(
                        f"a sliced axis has size {shape[axis]} at this input shape but {size} "
                        "when planned: slicing along an input-dependent axis is not supported")
                shape[axis] = len(keep)
            return tuple(shape)

        self.leaf_vars = [program.leaf_vars[i] for i in plan.kept]
        self.consts = {}
        for v, c in mode.consts.items():
            self.consts[v] = (c, new_shape(v), program.avals[v].dtype)
        self.static_consts = dict(program.consts)
        steps = []
        for i in mode.ops:
            op = program.ops[i]
            if i in mode.alias:
                src, neg = mode.alias[i]
                steps.append((op.name_stack, None, ((src, None),), neg, op.outvars, None))
                continue
            drop = mode.dropped.get(i, ())
            reads = tuple((v, mode.gathers.get((i, k)))
                          for k, v in enumerate(op.invars) if k not in drop)
            params = _rewrite_params(op, program, masks, new_shape)
            offset = mode.offsets.get(i)
            if offset is not None:
                offset = (offset, new_shape(op.outvars[0]), program.avals[op.outvars[0]].dtype)
            steps.append((op.name_stack, op.primitive, reads, params, op.outvars, offset))
        self.steps = steps
        self.outputs = [(program.outvars[p], mode.gathers.get((-1, p))) for p in mode.outputs]

    def __call__(self, leaves: Sequence[Any], args: Sequence[Any]) -> list[Any]:
        env: dict[int, Any] = dict(self.static_consts)
        env.update(zip(self.leaf_vars, leaves))
        env.update(zip(self.program.arg_vars, jax.tree_util.tree_leaves(args)))
        for v, (c, shape, dtype) in self.consts.items():
            env[v] = jnp.broadcast_to(jnp.asarray(c, dtype), shape)

        def read(x, gather):
            val = x.val if _is_literal(x) else env[x]
            if gather is not None:
                axis, _, keep = gather
                if np.shape(val)[axis] != len(keep):
                    val = jnp.take(val, keep, axis=axis)
            return val

        current = None
        scope = None
        try:
            for stack, prim, reads, params, outvars, offset in self.steps:
                if stack != current:
                    if scope is not None:
                        scope.__exit__(None, None, None)
                        scope = None
                    current = stack
                    if stack:
                        scope = jax.named_scope(stack)
                        scope.__enter__()
                ins = [read(x, g) for x, g in reads]
                if prim is None:  # a bypassed joint
                    env[outvars[0]] = lax.neg(ins[0]) if params else ins[0]
                    continue
                outs = prim.bind(*ins, **params)
                if not prim.multiple_results:
                    outs = [outs]
                if offset is not None:  # what dropped constant channels contributed
                    c, shape, dtype = offset
                    outs = [outs[0] + jnp.broadcast_to(jnp.asarray(c, dtype), shape)]
                env.update(zip(outvars, outs))
        finally:
            if scope is not None:
                scope.__exit__(None, None, None)
        return [read(x, g) for x, g in self.outputs]


def _rewrite_params(op, program: Program, masks, new_shape) -> dict:
    """``op``'s parameters for the sliced shapes of its operands and results."""
    params = op.params
    outs_masked = any(o in masks for o in op.outvars)
    ins_masked = any(isinstance(v, int) and v in masks for v in op.invars)
    if not (outs_masked or ins_masked):
        return params
    name = op.name
    params = dict(params)
    if name == "reshape":
        if params.get("dimensions") is not None:
            raise SurgeryError("cannot slice through a reshape with 'dimensions'")
        params["new_sizes"] = new_shape(op.outvars[0])
    elif name in ("broadcast_in_dim", "iota"):
        params["shape"] = new_shape(op.outvars[0])
    elif name == "conv_general_dilated":
        lhs = op.invars[0]
        groups = params["feature_group_count"]
        if groups > 1 and isinstance(lhs, int) and lhs in masks:
            axis = params["dimension_numbers"].lhs_spec[1]
            old, new = program.shape(lhs)[axis], new_shape(lhs)[axis]
            if groups != old:
                raise SurgeryError("cannot slice the input channels of a grouped convolution")
            params["feature_group_count"] = new
    return params


# ----------------------------------------------------------------------------------------------
# Planning: the analysis of one traced program with the zeroed values.


class _Planner:
    def __init__(self, program: Program, leaf_values: Sequence[Any], removed: set[int],
                 output_kinds: Sequence[tuple[str, str | None]], kept_state: set[str] | None):
        self.p = program
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

    # -- values of input-independent variables -------------------------------------------------
    def value(self, var: int) -> np.ndarray:
        return self.values([var])[0]

    def values(self, targets: Sequence[int]) -> list[np.ndarray]:
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
                    ins = [v.val if _is_literal(v) else env[v] for v in op.invars]
                    res = op.primitive.bind(*ins, **op.params)
                    env.update(zip(op.outvars, res if op.primitive.multiple_results else [res]))
                return [env[o] for o in outs]

            results = jax.jit(replay, compiler_options=_FAST_COMPILE)(*[known[v] for v in names])
            self.vals.update(zip(outs, (np.asarray(r) for r in results)))
        for x, val in inputs.items():
            self.vals[x] = np.asarray(val)
        return [self.vals[v] for v in targets]

    def is_zero(self, x: Any) -> bool:
        if _is_literal(x):
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

    # -- 1. classification, kills and bypasses ----------------------------------------------
    def classify(self) -> None:
        p, cls = self.p, self.cls
        for i, v in enumerate(p.leaf_vars):
            cls[v] = CONST if i in self.removed else STATIC
            if i in self.removed:
                self.zero.add(v)
        for v in p.consts:
            cls[v] = STATIC
        for v in p.arg_vars:
            cls[v] = DATA
        for op in p.ops:
            ins = [v for v in op.invars if isinstance(v, int)]
            kinds = {cls[v] for v in ins}
            if DATA in kinds:
                if op.name in _KILLING and any(cls[v] == CONST and self.is_zero(v) for v in ins):
                    self.killed.add(op.index)
                    for o in op.outvars:
                        cls[o] = CONST
                        self.zero.add(o)
                    continue
                for o in op.outvars:
                    cls[o] = DATA
                self._bypass(op)
            elif CONST in kinds:
                for o in op.outvars:
                    cls[o] = CONST
                if self._structurally_zero(op):
                    self.zero.update(op.outvars)
            else:
                for o in op.outvars:
                    cls[o] = STATIC

    def _structurally_zero(self, op) -> bool:
        """Whether a constant operation's result is exactly zero without evaluating it.

        Products with a zero factor count as zero (the other factor taken finite, as for the
        kills), so do quotients with a zero numerator."""
        ins = op.invars
        zero = [(not _is_literal(v) and v in self.zero) or (_is_literal(v) and not np.any(v.val))
                for v in ins]
        name = op.name
        if name in _ZERO_UNARY:
            return bool(ins) and zero[0] and all(zero)
        if name in _KILLING:
            return any(zero)
        if name == "div":
            return zero[0]
        if name in _ZERO_NARY or name == "pad":
            return all(zero)
        if name == "select_n":
            return all(zero[1:])
        return False

    def _bypass(self, op) -> None:
        if op.name not in ("add", "add_any", "sub") or len(op.invars) != 2:
            return
        a, b = op.invars
        out = op.outvars[0]
        shape, dtype = self.p.shape(out), self.p.avals[out].dtype

        def fits(x) -> bool:
            return (isinstance(x, int) and self.cls[x] == DATA and self.p.shape(x) == shape
                    and self.p.avals[x].dtype == dtype)

        if self.is_zero(b) and fits(a):
            self.alias[op.index] = (a, False)
        elif self.is_zero(a) and fits(b):
            self.alias[op.index] = (b, op.name == "sub")

    # -- 2. liveness ------------------------------------------------------------------------
    def liveness(self) -> None:
        p, cls = self.p, self.cls
        kept_outputs = []
        for pos, (kind, path) in enumerate(self.output_kinds):
            if kind == "state" and self.kept_state is not None and path not in self.kept_state:
                continue
            kept_outputs.append(pos)
        self.kept_outputs = kept_outputs
        main_data = [pos for pos in kept_outputs if self.output_kinds[pos][0] == "main"
                     and isinstance(p.outvars[pos], int) and cls[p.outvars[pos]] == DATA]
        if not main_data:
            raise SurgeryError(
                "with these groups removed the network's output no longer depends on its input; "
                "remove fewer groups (space.is_valid tells which sets are allowed)")
        live: set[int] = set()
        work: list[int] = []

        def use(x):
            if not isinstance(x, int) or cls[x] == CONST:
                return
            i = p.producer.get(x)
            if i is not None and i not in live:
                live.add(i)
                work.append(i)

        for pos in kept_outputs:
            use(p.outvars[pos])
        while work:
            i = work.pop()
            if i in self.alias:
                use(self.alias[i][0])
                continue
            for x in p.ops[i].invars:
                use(x)
        self.live = live

    # -- 3. concat operands that became constant: slice their consumers ---------------------
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
                if _is_literal(x) or cls[x] != CONST:
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
        if op.name in _KEEPS_ZERO:
            return True
        # relu and friends: max/min against a literal zero
        return op.name in ("max", "min") and all(
            (_is_literal(x) and not np.any(x.val)) or self.cls.get(x) == DATA
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
                ins = [v.val if _is_literal(v) else env[v] for v in op.invars]
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
                ins = [v.val if _is_literal(v) else env[v] for v in op.invars]
                ins[k] = only_removed.astype(env[x].dtype)
                results.append(op.primitive.bind(*ins, **op.params))
            return results

        results = jax.jit(replay, compiler_options=_FAST_COMPILE)(*[known[x] for x in names])
        offsets = {}
        for s, r in zip(order, results):
            r = np.asarray(r)
            if np.any(r):
                offsets[s] = _compact(r)
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
            return [(k, r) for k, r in us if r is not _FLEX]

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
            add_use(p.outvars[pos], (-1, pos), _FLEX if state else None)
        self.var_mask: dict[int, Mask] = {}

        def decide(x) -> Mask | None:
            """The slice ``x`` is produced with; uses that need another get a gather."""
            us = real(uses.get(x, []))
            keys = {_mask_key(r) for _, r in us}
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
                if r is not None:
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
            back = None if r is None else _backward(op, p, r)
            if r is not None and back is None:
                fail(o)
                r = None
            if r is not None:
                self.var_mask[o] = r
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
        if name in _ELEMENTWISE and out is not None:
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

    # -- 5. the plan ----------------------------------------------------------------------
    def constants(self) -> dict[int, np.ndarray]:
        consts = {}
        self.values([x for x in self.bake if x not in self.zero])
        for x, r in self.bake.items():
            if x in self.zero:
                aval = self.p.avals[x]
                val = np.zeros((1,) * len(aval.shape), aval.dtype)
            else:
                val = _compact(self.value(x))
            if r is not None:
                axis, _, keep = r
                if val.shape[axis] != 1:
                    val = np.take(val, keep, axis=axis)
            consts[x] = val
        return consts

    def run(self) -> None:
        self.classify()
        self.liveness()
        self.slice_concats()
        self.requirements()

    def mode_plan(self, kwargs, mutable) -> ModePlan:
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
                         and self.cls[x] == STATIC and k not in self.dropped.get(i, ())}
                        | {self.leaf_index[p.outvars[pos]] for pos in self.kept_outputs
                           if isinstance(p.outvars[pos], int) and p.outvars[pos] in self.leaf_index
                           and self.cls[p.outvars[pos]] == STATIC})
        return ModePlan(
            kwargs=dict(kwargs), mutable=tuple(mutable), signature=_signature(p),
            num_ops=len(p.ops), ops=ops, alias=dict(self.alias),
            dropped={i: tuple(s) for i, s in self.dropped.items() if i not in self.alias},
            masks=dict(self.masks), gathers=dict(self.gathers), consts=self.constants(),
            offsets=dict(self.offsets),
            outputs=tuple(self.kept_outputs),
            main_outputs=tuple(i for i, (k, _) in enumerate(self.output_kinds) if k == "main"),
            state_outputs=state_outputs, state_masks=state_masks,
            leaf_slices=dict(self.leaf_slices), leaf_uses=dict(self.leaf_uses),
            leaves=tuple(leaves))


_FLEX = object()  # a use that takes whatever slice its value has


def _compact(val: np.ndarray) -> np.ndarray:
    """Collapses every axis along which ``val`` does not vary to size 1."""
    val = np.asarray(val)
    for axis in range(val.ndim):
        if val.shape[axis] > 1:
            first = np.take(val, [0], axis=axis)
            if np.array_equal(val, np.broadcast_to(first, val.shape),
                              equal_nan=np.issubdtype(val.dtype, np.inexact)):
                val = first
    return np.ascontiguousarray(val)


def _backward(op, program: Program, req: Mask) -> dict[int, Mask | None] | None:
    """Slices of a static operation's operands that give its result sliced as ``req``."""
    axis, size, keep = req
    name = op.name
    out_shape = program.shape(op.outvars[0])
    ins = op.invars
    if name in _ELEMENTWISE:
        res: dict[int, Mask | None] = {}
        for k, x in enumerate(ins):
            shp = _shape_of(program, x)
            if not shp:
                continue
            if len(shp) != len(out_shape):
                return None
            if shp[axis] == size:
                if _is_literal(x):
                    return None
                res[k] = req
            elif shp[axis] != 1:
                return None
        return res
    if _is_literal(ins[0]):
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


# ----------------------------------------------------------------------------------------------
# The public entry point.


def _linen_collections(apply_fn: Callable[..., Any], variables: Any) -> tuple[str, ...] | None:
    """Non-parameter collections of a linen ``Module.apply`` (None for other apply_fns)."""
    owner = getattr(apply_fn, "__self__", None)
    if not isinstance(owner, nn.Module) or getattr(apply_fn, "__func__", None) is not \
            nn.Module.apply:
        return None
    if not isinstance(variables, Mapping):
        return None
    return tuple(sorted(str(c) for c in variables if c != "params"))


def _output_kinds(program: Program, mutable: tuple[str, ...]) -> list[tuple[str, str | None]]:
    n = len(program.outvars)
    if not mutable:
        return [("main", None)] * n
    tree = jax.tree_util.tree_unflatten(program.out_tree, list(range(n)))
    kinds: list[tuple[str, str | None]] = [("main", None)] * n
    for path, pos in jax.tree_util.tree_flatten_with_path(tree[1])[0]:
        kinds[pos] = ("state", leaf_path(path))
    return kinds


def construct_subnetwork(
    space: SearchSpace,
    variables: Any,
    *,
    modes: Iterable[Mapping[str, Any]] | None = None,
) -> SubNetwork:
    """Builds the sub-network of ``variables``' zero groups (Section 3.3, Figure 4).

    A group is removed when every one of its leaves is exactly 0 in ``variables``. The result
    computes what ``space.apply_fn(variables, x, **space.apply_kwargs)`` computes (to float
    rounding) for inputs of any batch size, without the removed structures, the joints they
    leave with one input, the consumer channels they fed and the code that only served them.

    Args:
      space: the search space of the network, from :func:`generate_search_space`.
      variables: the full network's variables with the removed groups at zero (e.g. H2SPG's
        result, or ``space.zero_groups(variables, indices)``).
      modes: keyword-argument sets of ``apply_fn`` to plan, besides the space's own; by default
        also the opposite ``train`` flag when the space was traced with one.

    Returns:
      A :class:`SubNetwork`; ``sub.apply(sub.variables, x, **kwargs)`` runs it.

    Raises:
      SurgeryError: the zero groups form an invalid set (they disconnect the output from the
        input), or ``variables`` do not match the space.
    """
    program = space.trace.program
    flat, _ = jax.tree_util.tree_flatten_with_path(variables)
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
            f"the zero groups {zero} form an invalid set: without them no path joins the input "
            f"to the output. Zero groups: {names}. Keep at least one of them non-zero "
            "(space.is_valid checks a set)")
    removed = {i for g in zero for i in space.groups[g].leaves}
    arg_tree = getattr(program, "arg_tree", None)
    specs = [jax.ShapeDtypeStruct(program.avals[v].shape, program.avals[v].dtype)
             for v in program.arg_vars]
    sample_args = (jax.tree_util.tree_unflatten(arg_tree, specs) if arg_tree is not None
                   else tuple(specs))
    apply_fn, base_kwargs = space.apply_fn, dict(space.apply_kwargs)
    collections = _linen_collections(apply_fn, variables)

    alt_args = _other_batch(sample_args)

    def plan_mode(kw, mutable, kept_state, program=None) -> list[ModePlan]:
        """Plans at the sample's batch size and, if its program differs (a model may skip
        no-op broadcasts at batch size 1), at a second one."""
        call_kw = dict(kw, mutable=list(mutable)) if mutable else kw
        programs = [program or trace_program(apply_fn, variables, *sample_args, **call_kw)[0]]
        if alt_args is not None:
            try:
                alt = trace_program(apply_fn, variables, *alt_args, **call_kw)[0]
            except TraceError:
                alt = None
            if alt is not None and _signature(alt) != _signature(programs[0]):
                programs.append(alt)
        plans = []
        for prog in programs:
            planner = _Planner(prog, leaf_values, removed, _output_kinds(prog, mutable),
                               kept_state)
            planner.run()
            plans.append(planner.mode_plan(kw, mutable))
        return plans

    # inference mode, on the space's own program first
    mode_plans = plan_mode(base_kwargs, (), None, program)
    unavailable: dict[tuple, str] = {}
    wanted = [dict(m) for m in (modes or ())]
    if modes is None and isinstance(base_kwargs.get("train"), bool):
        wanted.append({**base_kwargs, "train": not base_kwargs["train"]})
    kept_paths = {paths[i] for i in mode_plans[0].leaves}
    for kw in wanted:
        kw = {**base_kwargs, **kw}
        if _kwargs_key(kw) == mode_plans[0].key():
            continue
        try:
            mode_plans.extend(plan_mode(kw, collections or (), kept_paths))
        except (TraceError, SurgeryError) as e:
            unavailable[_kwargs_key(kw)] = str(e)
    mode_plans, kept, leaf_slices = _reconcile(mode_plans, paths, unavailable)
    plan = SubNetworkPlan(
        leaf_paths=tuple(paths),
        leaf_shapes=tuple(tuple(np.shape(x)) for x in leaf_values),
        leaf_dtypes=tuple(str(jnp.result_type(x)) for x in leaf_values),
        kept=kept, leaf_slices=leaf_slices, removed_groups=tuple(zero),
        removed_paths=tuple(sorted(paths[i] for i in removed)),
        modes=tuple(mode_plans), sample_args=sample_args, unavailable=unavailable)
    pruned = [_slice_leaf(leaf_values[i], leaf_slices.get(i)) for i in kept]
    sub_vars = _unflatten_paths([paths[i] for i in kept], pruned)
    return SubNetwork(plan=plan, apply_fn=apply_fn, attached=sub_vars)


def _other_batch(args: Any) -> Any:
    """``args`` with batch size 2 if it is 1, else 1 (None without a common leading axis)."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    if not leaves or any(len(a.shape) == 0 or a.shape[0] != leaves[0].shape[0] for a in leaves):
        return None
    b = 2 if leaves[0].shape[0] == 1 else 1
    return jax.tree_util.tree_unflatten(
        tree, [jax.ShapeDtypeStruct((b, *a.shape[1:]), a.dtype) for a in leaves])


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
        if len({_mask_key(w) for w in wants}) == 1 and wants[0] is not None:
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
            if _mask_equal(have, want):
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


# ----------------------------------------------------------------------------------------------
# The sub-network as a linen Module.


class SubNetwork(nn.Module):
    """A constructed sub-network: a linen Module carrying its (pruned) variables.

    ``sub.apply(sub.variables, x, **kwargs)`` runs it like the original ``apply_fn`` (any batch
    size; ``train=True, mutable=["batch_stats"]`` updates BatchNorm statistics); ``sub.variables``
    holds the kept leaves under their original paths. It re-traces the original ``apply_fn`` once
    per input shape and mode and runs the rewritten program, so gradients, ``jit``, ``vmap``,
    orbax and ``jax.export`` work as for any linen Module. (The rewritten program is made of
    primitives: custom derivative rules of the original, e.g. ``custom_jvp`` of ``relu``, give
    way to the derivatives of the primitives they wrap.)

    Attributes:
      plan: the :class:`SubNetworkPlan` (architecture: what is kept, sliced and folded).
      apply_fn: the original network's ``apply_fn``.
    """

    plan: SubNetworkPlan
    apply_fn: Callable[..., Any]
    attached: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)

    @property
    def variables(self) -> Any:
        """The pruned variables (unbound), or the bound variables inside ``apply``."""
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
        _kept_leaves(self.plan, variables)
        return self.clone(attached=variables, parent=None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.is_initializing():
            raise SurgeryError("a SubNetwork is not initialised: its variables are "
                               "sub.variables (construct_subnetwork builds them)")
        variables = self.scope.variables()
        leaves = _kept_leaves(self.plan, variables)
        run = self.plan.runner(self.apply_fn, dict(self._base_kwargs(), **kwargs), args)
        mode = run.mode
        outs = run(leaves, args)
        by_pos = dict(zip(mode.outputs, outs))
        tree = run.out_tree
        main_tree = tree.children()[0] if mode.mutable else tree
        result = jax.tree_util.tree_unflatten(main_tree, [by_pos[p] for p in mode.main_outputs])
        for col in mode.mutable:
            if not self.is_mutable_collection(col):
                continue
            items = [(path.split("/", 1)[1], by_pos[p]) for p, path in mode.state_outputs.items()
                     if path.split("/", 1)[0] == col]
            if not items:
                continue
            new = _unflatten_paths([k for k, _ in items], [v for _, v in items])
            for name, value in new.items():
                self.put_variable(col, name, value)
        return result

    def _base_kwargs(self) -> dict[str, Any]:
        return dict(self.plan.modes[0].kwargs)


def _kept_leaves(plan: SubNetworkPlan, variables: Any) -> list[Any]:
    """The kept leaves of ``variables`` in plan order, checked against the plan."""
    flat, _ = jax.tree_util.tree_flatten_with_path(variables)
    by_path = {leaf_path(p): x for p, x in flat}
    extra = sorted(set(by_path) - set(plan.kept_paths))
    if extra:
        raise SurgeryError(
            f"variables hold leaves the sub-network does not have: {extra[:3]}"
            f"{' ...' if len(extra) > 3 else ''}; pass sub.variables, not the full network's")
    missing = [p for p in plan.kept_paths if p not in by_path]
    if missing:
        raise SurgeryError(f"variables lack {missing[:3]}{' ...' if len(missing) > 3 else ''}; "
                           "pass sub.variables (or a tree of the same structure)")
    out = []
    for i in plan.kept:
        path = plan.leaf_paths[i]
        x = by_path[path]
        want = plan.kept_shape(i)
        if tuple(np.shape(x)) != want:
            raise SurgeryError(f"sub-network variable {path!r} has shape {tuple(np.shape(x))}, "
                               f"expected {want}; pass sub.variables (or a tree like it)")
        out.append(x)
    return out


def relative_difference(ref: Any, got: Any) -> float:
    """max |ref - got| / max |ref| over the leaves of two output trees (in float64): how far a
    sub-network's outputs are from the zeroed full network's. ``inf`` if the structures or
    shapes differ."""
    ref_leaves, got_leaves = jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)
    if len(ref_leaves) != len(got_leaves):
        return float("inf")
    worst = 0.0
    for r, g in zip(ref_leaves, got_leaves):
        r, g = np.asarray(r, np.float64), np.asarray(g, np.float64)
        if r.shape != g.shape:
            return float("inf")
        worst = max(worst, float(np.max(np.abs(r - g), initial=0.0)
                                 / (np.max(np.abs(r), initial=0.0) + 1e-12)))
    return worst
