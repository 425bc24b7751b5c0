"""The plan type of sub-network construction: what is kept, sliced and folded.

A :class:`SubNetworkPlan` holds the full network's variables as the user's own treedef with
one ``jax.ShapeDtypeStruct`` per leaf (extended dtypes such as PRNG keys included), the kept
leaves and their slices, and one :class:`ModePlan` per mode (a set of keyword arguments of
``apply_fn``): the rewrite of that mode's traced program. Plans are values; they save to JSON
plus arrays (:meth:`SubNetworkPlan.to_state`) for orbax.

The sub-network's variables keep the user's tree (:func:`prune_tree`): a removed leaf, or a
subtree all of whose leaves are removed, is dropped from a dict (a top-level collection stays,
empty) and becomes ``None`` in a tuple, list, dataclass or any other pytree node.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import functools
import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from asgssd_jax.trace import leaf_path

__all__ = ["Mask", "ModePlan", "SubNetworkPlan", "SurgeryError", "prune_tree", "split_kwargs",
           "typed_rngs"]


class SurgeryError(ValueError):
    """The sub-network cannot be built or run as asked; the message says what to do."""


Mask = tuple[int, int, np.ndarray]  # (axis, original size, kept indices)


def mask_key(m: Mask | None):
    return None if m is None else (m[0], m[1], m[2].tobytes())


def mask_equal(a: Mask | None, b: Mask | None) -> bool:
    return mask_key(a) == mask_key(b)


def is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def split_kwargs(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(static, dynamic)``: keyword arguments whose leaves are all arrays (``rngs=``, masks)
    are traced as inputs of the program; the others (``train=True``) are part of the mode."""
    static, dynamic = {}, {}
    for k, v in kwargs.items():
        leaves = jax.tree_util.tree_leaves(v)
        if leaves and all(is_array(x) for x in leaves):
            dynamic[k] = v
        else:
            static[k] = v
    return static, dynamic


def typed_rngs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` with raw ``uint32[2]`` keys in ``rngs=`` wrapped as typed PRNG keys (linen
    draws the same bits from both; one program serves both spellings)."""
    rngs = kwargs.get("rngs")
    if rngs is None:
        return dict(kwargs)

    def wrap(k):
        if getattr(k, "dtype", None) == np.uint32 and np.shape(k)[-1:] == (2,):
            return jax.random.wrap_key_data(k)
        return k

    return dict(kwargs, rngs=jax.tree_util.tree_map(wrap, rngs))


def kwargs_key(kwargs: Mapping[str, Any], dynamic: Sequence[str] = ()) -> tuple:
    items = []
    for k in sorted(kwargs):
        v = kwargs[k]
        try:
            hash(v)
        except TypeError:
            v = repr(v)
        items.append((k, v))
    return tuple(items), tuple(sorted(dynamic))


def is_extended(dtype: Any) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.extended)


def to_host(x: Any) -> Any:
    """A numpy copy, except for extended dtypes (PRNG keys), which stay JAX arrays."""
    return x if is_extended(getattr(x, "dtype", None) or np.float32) else np.asarray(x)


@dataclasses.dataclass(eq=False)
class ModePlan:
    """The rewrite of the program of one mode.

    Operation indices and variable ids refer to the flat :class:`~asgssd_jax.trace.Program`
    of ``apply_fn(variables, *args, dynamic_kwargs)``; any re-trace with another input shape
    has the same ones (``signature``).
    """

    kwargs: dict[str, Any]  # static keyword arguments of apply_fn (without ``mutable``)
    dynamic: tuple[str, ...]  # keyword arguments traced as inputs (e.g. linen's ``rngs``)
    mutable: tuple[str, ...]  # collections traced as mutable (linen)
    signature: str  # hash of the program's structure
    num_ops: int
    ops: tuple[int, ...]  # operations to run, in program order
    alias: dict[int, tuple[int, bool]]  # op -> (var it forwards, negate)
    dropped: dict[int, tuple[int, ...]]  # concatenate op -> operand slots dropped
    masks: dict[int, Mask]  # var -> kept positions along an axis
    gathers: dict[tuple[int, int], Mask]  # (op, slot) or (-1, output position) -> slice on read
    consts: dict[int, np.ndarray]  # var -> folded constant (size-1 axes broadcast)
    computed: dict[int, tuple[int, ...]]  # var -> ops computing it from ``const_inputs``
    const_inputs: dict[int, np.ndarray]  # folded values the ``computed`` operations start from
    offsets: dict[int, np.ndarray]  # contraction op -> folded constant added to its result
    outputs: tuple[int, ...]  # kept positions of the program's flat outputs
    main_outputs: tuple[int, ...]  # positions of the function's result (not mutable state)
    state_outputs: dict[int, str]  # kept output position -> variables path (mutable state)
    state_masks: dict[int, Any]  # kept state output -> its slice as produced ("leaf": the leaf's)
    leaf_slices: dict[int, Mask]  # leaf index -> kept positions (decided by this mode)
    leaf_uses: dict[int, tuple[tuple[int, int], ...]]  # leaf -> its (op, slot) reads
    leaves: tuple[int, ...]  # leaf indices this mode reads

    def key(self) -> tuple:
        return kwargs_key(self.kwargs, self.dynamic)

    def describe(self) -> str:
        extra = "".join(f", {k}=..." for k in self.dynamic)
        return f"{self.kwargs}{extra}"


_REMOVED = object()  # a removed leaf while the sub-network's tree is built
_DICTS = (dict, collections.OrderedDict)


def _is_mapping_node(node: Any) -> bool:
    if type(node) in _DICTS:
        return True
    try:
        from flax.core import FrozenDict
    except ImportError:  # pragma: no cover
        return False
    return isinstance(node, FrozenDict)


def _prune(node: Any, top: bool) -> Any:
    """``node`` without ``_REMOVED`` leaves; ``_REMOVED`` when every leaf of it was removed."""
    if node is _REMOVED:
        return _REMOVED
    if _is_mapping_node(node):
        out = {}
        removed_any = False
        for k, v in node.items():
            pv = _prune(v, False)
            if pv is _REMOVED:
                removed_any = True
                if top and v is not _REMOVED:  # a collection stays, empty
                    out[k] = type(v)() if type(v) in _DICTS else {}
                continue
            out[k] = pv
        if removed_any and not out and not top:
            return _REMOVED
        return type(node)(out)
    children, tree = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
    if not children or tree.num_nodes == 1:  # a leaf or an empty node
        return node
    new = [_prune(c, False) for c in children]
    if all(c is _REMOVED for c in new):
        return _REMOVED
    try:
        return jax.tree_util.tree_unflatten(tree, [None if c is _REMOVED else c for c in new])
    except Exception as e:  # a custom node that refuses None
        raise SurgeryError(
            f"cannot rebuild a {type(node).__name__} of the variables with a removed leaf as "
            f"None ({type(e).__name__}: {e}); keep variables in dicts, tuples, lists or pytree "
            "nodes that accept None") from e


def prune_tree(treedef: Any, kept: Mapping[int, Any]) -> Any:
    """The tree of ``treedef`` holding only the leaves in ``kept`` (leaf index -> value)."""
    full = jax.tree_util.tree_unflatten(
        treedef, [kept.get(i, _REMOVED) for i in range(treedef.num_leaves)])
    out = _prune(full, True)
    return None if out is _REMOVED else out


@dataclasses.dataclass(eq=False)
class SubNetworkPlan:
    """Everything that defines a sub-network besides the original model code and its values.

    Attributes:
      treedef, leaf_avals: the full network's variables (the user's treedef and one
        ``jax.ShapeDtypeStruct`` per leaf).
      kept: indices of the leaves the sub-network keeps, in flattening order.
      leaf_slices: kept leaf index -> (axis, size, kept indices) for sliced leaves.
      removed_groups: the zero groups of the search space that were removed.
      modes: one :class:`ModePlan` per supported set of keyword arguments.
      sample_args: shapes and dtypes of the sample input (``jax.ShapeDtypeStruct`` tree).
      unavailable: modes that could not be planned, with the reason.
    """

    treedef: Any
    leaf_avals: tuple[jax.ShapeDtypeStruct, ...]
    kept: tuple[int, ...]
    leaf_slices: dict[int, Mask]
    removed_groups: tuple[int, ...]
    removed_paths: tuple[str, ...]
    modes: tuple[ModePlan, ...]
    sample_args: Any
    unavailable: dict[tuple, str] = dataclasses.field(default_factory=dict)
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    # -- structure -------------------------------------------------------------------------------
    @functools.cached_property
    def leaf_paths(self) -> tuple[str, ...]:
        """"/"-joined path of every leaf of the full network's variables."""
        flat = jax.tree_util.tree_flatten_with_path(self.full_spec())[0]
        return tuple(leaf_path(p) for p, _ in flat)

    @property
    def kept_paths(self) -> tuple[str, ...]:
        return tuple(self.leaf_paths[i] for i in self.kept)

    def kept_shape(self, i: int) -> tuple[int, ...]:
        shape = list(self.leaf_avals[i].shape)
        m = self.leaf_slices.get(i)
        if m is not None:
            shape[m[0]] = len(m[2])
        return tuple(shape)

    def full_spec(self) -> Any:
        """The full network's variables as a tree of ``jax.ShapeDtypeStruct``."""
        return jax.tree_util.tree_unflatten(self.treedef, list(self.leaf_avals))

    def kept_spec(self) -> Any:
        """The sub-network's variables as a tree of ``jax.ShapeDtypeStruct``."""
        return self.pruned({i: jax.ShapeDtypeStruct(self.kept_shape(i), self.leaf_avals[i].dtype)
                            for i in self.kept})

    @functools.cached_property
    def kept_treedef(self) -> Any:
        return jax.tree_util.tree_structure(self.kept_spec())

    def pruned(self, kept: Mapping[int, Any]) -> Any:
        """The sub-network's tree of the user's kind holding ``kept`` (leaf index -> value)."""
        return prune_tree(self.treedef, kept)

    def modes_for(self, kwargs: Mapping[str, Any], dynamic: Sequence[str]) -> list[ModePlan]:
        """The plans made for these keyword arguments (one per program structure)."""
        key = kwargs_key(kwargs, dynamic)
        found = [m for m in self.modes if m.key() == key]
        if found:
            return found
        if key in self.unavailable:
            raise SurgeryError(f"the sub-network cannot run with {dict(kwargs)}: "
                               f"{self.unavailable[key]}")
        known = " or ".join(sorted({m.describe() for m in self.modes}))
        given = f"{dict(kwargs)}" + "".join(f", {k}=..." for k in sorted(dynamic))
        raise SurgeryError(
            f"the sub-network was planned for the keyword arguments {known}, not {given}; "
            "pass modes=[...] to construct_subnetwork to plan others (array-valued ones such "
            "as rngs= with sample values)")

    # -- serialisation (orbax checkpoints: JSON metadata plus arrays) -------------------------
    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(metadata, arrays)``: a JSON-able description and the arrays it names.

        The treedef, leaf avals and sample input specs are pickled (base64) into the metadata:
        classes of custom pytree nodes must be importable where the plan is loaded."""
        import json

        arrays: dict[str, np.ndarray] = {"none": np.zeros((), np.int32)}

        def mask(name: str, m: Mask) -> list:
            arrays[name] = np.asarray(m[2])
            return [int(m[0]), int(m[1]), name]

        def store(name: str, value: Any) -> str:
            arrays[name] = np.asarray(value)
            return name

        modes = []
        for k, m in enumerate(self.modes):
            try:
                json.dumps(m.kwargs)
            except TypeError as e:
                raise SurgeryError(f"keyword arguments {m.kwargs} cannot be saved: {e}") from e
            modes.append({
                "kwargs": m.kwargs, "dynamic": list(m.dynamic), "mutable": list(m.mutable),
                "signature": m.signature, "num_ops": m.num_ops, "ops": list(m.ops),
                "alias": [[i, s, bool(n)] for i, (s, n) in m.alias.items()],
                "dropped": [[i, list(s)] for i, s in m.dropped.items()],
                "masks": [[v, *mask(f"m{k}_mask_{v}", r)] for v, r in m.masks.items()],
                "gathers": [[i, s, *mask(f"m{k}_gather_{i}_{s}", r)]
                            for (i, s), r in m.gathers.items()],
                "consts": [[v, store(f"m{k}_const_{v}", c)] for v, c in m.consts.items()],
                "computed": [[v, list(ops)] for v, ops in m.computed.items()],
                "const_inputs": [[v, store(f"m{k}_input_{v}", c)]
                                 for v, c in m.const_inputs.items()],
                "offsets": [[i, store(f"m{k}_offset_{i}", c)] for i, c in m.offsets.items()],
                "outputs": list(m.outputs), "main_outputs": list(m.main_outputs),
                "state_outputs": [[p, path] for p, path in m.state_outputs.items()],
                "leaves": list(m.leaves),
            })
        structure = pickle.dumps((self.treedef, tuple(self.leaf_avals), self.sample_args))
        meta = {
            "format": 2,
            "structure": base64.b64encode(structure).decode("ascii"),
            "leaf_paths": list(self.leaf_paths),
            "kept": list(self.kept),
            "leaf_slices": [[i, *mask(f"leaf_{i}", r)] for i, r in self.leaf_slices.items()],
            "removed_groups": list(self.removed_groups),
            "removed_paths": list(self.removed_paths),
            "modes": modes,
            "unavailable": [[[list(kv) for kv in key[0]], list(key[1]), why]
                            for key, why in self.unavailable.items()],
        }
        json.dumps(meta)
        return meta, arrays

    @classmethod
    def from_state(cls, meta: Mapping[str, Any], arrays: Mapping[str, Any]) -> SubNetworkPlan:
        """Inverse of :meth:`to_state`."""
        if meta.get("format") != 2:
            raise SurgeryError(f"unknown sub-network plan format {meta.get('format')!r}; "
                               "construct the sub-network again with this version")

        def mask(axis, size, name) -> Mask:
            return (int(axis), int(size), np.asarray(arrays[name], np.int32))

        modes = []
        for m in meta["modes"]:
            modes.append(ModePlan(
                kwargs=dict(m["kwargs"]), dynamic=tuple(m["dynamic"]),
                mutable=tuple(m["mutable"]), signature=m["signature"],
                num_ops=int(m["num_ops"]), ops=tuple(m["ops"]),
                alias={int(i): (int(s), bool(n)) for i, s, n in m["alias"]},
                dropped={int(i): tuple(s) for i, s in m["dropped"]},
                masks={int(v): mask(a, z, n) for v, a, z, n in m["masks"]},
                gathers={(int(i), int(s)): mask(a, z, n) for i, s, a, z, n in m["gathers"]},
                consts={int(v): np.asarray(arrays[n]) for v, n in m["consts"]},
                computed={int(v): tuple(ops) for v, ops in m["computed"]},
                const_inputs={int(v): np.asarray(arrays[n]) for v, n in m["const_inputs"]},
                offsets={int(i): np.asarray(arrays[n]) for i, n in m["offsets"]},
                outputs=tuple(m["outputs"]), main_outputs=tuple(m["main_outputs"]),
                state_outputs={int(p): path for p, path in m["state_outputs"]},
                state_masks={}, leaf_slices={}, leaf_uses={}, leaves=tuple(m["leaves"])))
        treedef, avals, sample = pickle.loads(base64.b64decode(meta["structure"]))
        return cls(
            treedef=treedef, leaf_avals=tuple(avals),
            kept=tuple(meta["kept"]),
            leaf_slices={int(i): mask(a, z, n) for i, a, z, n in meta["leaf_slices"]},
            removed_groups=tuple(meta["removed_groups"]),
            removed_paths=tuple(meta["removed_paths"]),
            modes=tuple(modes), sample_args=sample,
            unavailable={(tuple(tuple(kv) for kv in items), tuple(dyn)): why
                         for items, dyn, why in meta["unavailable"]})

    # -- variables -------------------------------------------------------------------------------
    def kept_leaves(self, variables: Any) -> list[Any]:
        """The kept leaves of ``variables`` (a tree like ``sub.variables``) in plan order."""
        leaves, tree = jax.tree_util.tree_flatten(variables)
        if tree != self.kept_treedef:
            by_path = {leaf_path(p): x
                       for p, x in jax.tree_util.tree_flatten_with_path(variables)[0]}
            kept = set(self.kept_paths)
            extra = sorted(set(by_path) - kept)
            if extra:
                raise SurgeryError(
                    f"variables hold leaves the sub-network does not have: {extra[:3]}"
                    f"{' ...' if len(extra) > 3 else ''}; pass sub.variables, not the full "
                    "network's")
            missing = [p for p in self.kept_paths if p not in by_path]
            if missing:
                raise SurgeryError(
                    f"variables lack {missing[:3]}{' ...' if len(missing) > 3 else ''}; pass "
                    "sub.variables (or a tree of the same structure)")
            leaves = [by_path[p] for p in self.kept_paths]
        for i, x in zip(self.kept, leaves):
            want = self.kept_shape(i)
            if tuple(np.shape(x)) != want:
                raise SurgeryError(
                    f"sub-network variable {self.leaf_paths[i]!r} has shape "
                    f"{tuple(np.shape(x))}, expected {want}; pass sub.variables (or a tree "
                    "like it)")
        return leaves


def bind_kwargs(apply_fn: Callable[..., Any], static: Mapping[str, Any],
                dynamic: Sequence[str]) -> Callable[..., Any]:
    """``apply_fn`` as ``f(variables, *args, dynamic_values)`` (the last positional input holds
    the array-valued keyword arguments, so that they are traced as inputs)."""
    if not dynamic:
        return lambda v, *a: apply_fn(v, *a, **static)

    def fn(v, *a):
        return apply_fn(v, *a[:-1], **static, **a[-1])

    return fn
