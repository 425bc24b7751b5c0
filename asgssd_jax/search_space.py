"""Search space: removal structures and their variable groups (Algorithm 2, lines 11-16).

A *removal structure* is a segment that owns trainable variables and whose every outgoing edge
ends in a removal-tolerant joint (add, sub, concatenate). For a concatenate, the channels the
segment contributes must be traceable, through per-channel operations, to contractions (conv or
dense) that consume them, so that removing the segment can slice those contractions. A leaf
used by two segments (weight sharing) makes neither removable. The trainable leaves of each
removal structure form one group of G_s; every other trainable leaf is in G_s^C.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np

from asgssd_jax.cost import op_macs
from asgssd_jax.naming import operation_name
from asgssd_jax.primitives import CONTROL_FLOW, ELEMENTWISE, REDUCE, WINDOW
from asgssd_jax.program import slice_path
from asgssd_jax.segments import SegmentGraph, build_segment_graph
from asgssd_jax.trace import TraceGraph, trace
from asgssd_jax.zero_invariance import check_zero_invariance

__all__ = [
    "ChannelSite",
    "ChannelState",
    "ExcludedCandidate",
    "Group",
    "GroupSlice",
    "LeafGroupMap",
    "SearchSpace",
    "follow_channels",
    "generate_search_space",
    "io_pairs",
    "pairs_connected",
    "pairs_stay_connected",
    "trace_channels",
]


# --------------------------------------------------------------------------------------------
# Channel tracing through per-channel operations (for concatenate inputs).

# Kept under their former names for modules that import them from here.
_ELEMENTWISE = ELEMENTWISE
_REDUCE = REDUCE
_WINDOW = WINDOW


@dataclasses.dataclass(frozen=True)
class ChannelState:
    """Where a concat operand's channels sit along one axis of a traced value.

    Position ``p`` of the operand (``0 <= p < width``) occupies the indices
    ``(o * total + offset + p) * inner + i`` for every ``o`` and ``0 <= i < inner``.
    """

    axis: int
    inner: int
    total: int
    offset: int
    width: int

    def indices(self, size: int) -> np.ndarray:
        """Boolean mask over an axis of ``size``: True where this operand's channels are."""
        idx = np.arange(size)
        pos = (idx // self.inner) % self.total
        return (pos >= self.offset) & (pos < self.offset + self.width)


@dataclasses.dataclass(frozen=True)
class ChannelSite:
    """A contraction that consumes traced channels: ``op`` contracts ``operand``'s ``state``."""

    op: int
    operand: int
    state: ChannelState


def _shape_of(program, x) -> tuple[int, ...]:
    return program.shape(x) if isinstance(x, int) else tuple(np.shape(x.val))


def _advance(op, program, tracked: dict[int, ChannelState], data) -> Any:
    """New states of ``op``'s outputs, a ChannelSite (contraction reached), or None (fail)."""
    name = op.name
    ins = [x for x in op.invars if isinstance(x, int) and x in data]
    t_ins = [x for x in ins if x in tracked]
    states = {tracked[x] for x in t_ins}
    if name == "concatenate":
        if len(t_ins) != 1 or op.invars.count(t_ins[0]) != 1:
            return None
        (s,) = states
        if op.params["dimension"] != s.axis or s.inner != 1:
            return None
        k = op.invars.index(t_ins[0])
        before = sum(_shape_of(program, x)[s.axis] for x in op.invars[:k])
        total = program.shape(op.outvars[0])[s.axis]
        return dataclasses.replace(s, total=total, offset=s.offset + before)
    if len(t_ins) != len(ins) or len(states) != 1:
        return None  # mixes the channels with other data
    (s,) = states
    if name in ELEMENTWISE:
        out_shape = program.shape(op.outvars[0])
        for x in op.invars:
            if isinstance(x, int) and x in data:
                continue
            shp = _shape_of(program, x)
            if shp and (len(shp) != len(out_shape) or shp[s.axis] not in (1, out_shape[s.axis])):
                return None
        return s
    if name in REDUCE:
        axes = tuple(op.params["axes"])
        if s.axis in axes:
            return None
        return dataclasses.replace(s, axis=s.axis - sum(a < s.axis for a in axes))
    if name in WINDOW:
        p = op.params
        if (p["window_dimensions"][s.axis] != 1 or p["window_strides"][s.axis] != 1
                or tuple(p["padding"][s.axis]) != (0, 0)):
            return None
        return s
    if name == "broadcast_in_dim":
        new_axis = op.params["broadcast_dimensions"][s.axis]
        if op.params["shape"][new_axis] != _shape_of(program, op.invars[0])[s.axis]:
            return None
        return dataclasses.replace(s, axis=new_axis)
    if name == "transpose":
        return dataclasses.replace(s, axis=list(op.params["permutation"]).index(s.axis))
    if name == "squeeze":
        dims = tuple(op.params["dimensions"])
        return None if s.axis in dims else dataclasses.replace(
            s, axis=s.axis - sum(d < s.axis for d in dims))
    if name == "reshape":
        return _through_reshape(s, _shape_of(program, op.invars[0]), op.params["new_sizes"])
    if name == "pad":
        if tuple(op.params["padding_config"][s.axis]) != (0, 0, 0):
            return None
        return s
    if name == "conv_general_dilated":
        if op.invars[0] not in tracked or op.invars[1] in data:
            return None
        dn = op.params["dimension_numbers"]
        if s.axis != dn.lhs_spec[1] or s.inner != 1:
            return None
        in_features = _shape_of(program, op.invars[0])[s.axis]
        groups = op.params["feature_group_count"]
        if groups == 1:
            return ChannelSite(op.index, 0, s)
        if groups == in_features and op.params["batch_group_count"] == 1:  # depthwise
            out_features = program.shape(op.outvars[0])[dn.out_spec[1]]
            mult = out_features // in_features
            return dataclasses.replace(s, axis=dn.out_spec[1], inner=mult)
        return None
    if name == "dot_general":
        (lc, rc), (lb, rb) = op.params["dimension_numbers"]
        operand = 0 if op.invars[0] in tracked else 1
        if op.invars[1 - operand] in data:
            return None
        contract, batch = (lc, lb) if operand == 0 else (rc, rb)
        if s.axis in contract:
            return ChannelSite(op.index, operand, s)
        if s.axis in batch:
            return None
        rank = len(_shape_of(program, op.invars[operand]))
        free = [d for d in range(rank) if d not in contract and d not in batch]
        pos = len(lb) + free.index(s.axis)
        if operand == 1:
            lrank = len(_shape_of(program, op.invars[0]))
            pos += lrank - len(lc) - len(lb)
        return dataclasses.replace(s, axis=pos)
    return None


def _through_reshape(s: ChannelState, old: Sequence[int], new: Sequence[int]):
    p0 = math.prod(old[: s.axis])
    inner_old = math.prod(old[s.axis + 1 :])
    q = 1
    for j, n in enumerate(new):
        if q <= p0 and p0 % q == 0 and q * n * math.prod(new[j + 1 :]) == math.prod(old):
            r = math.prod(new[j + 1 :])
            if q * n >= p0 * old[s.axis] and r and inner_old % r == 0:
                return dataclasses.replace(s, axis=j, inner=s.inner * (inner_old // r))
        q *= n
    return None


def trace_channels(
    trace_graph: TraceGraph, concat_op: int, operand: int
) -> list[ChannelSite] | None:
    """Follows operand ``operand`` of concatenate op ``concat_op`` to the contractions that
    consume its channels. Returns those sites, or None when the channels reach anything else
    (another data operand, a reduction over them, the output, ...)."""
    found = follow_channels(trace_graph.program, concat_op, operand)
    return None if found is None else found[1]


def follow_channels(
    program,
    concat_op: int,
    operand: int,
    *,
    data: frozenset[int] | None = None,
    outputs: set[int] | None = None,
    skip: Callable[[int], bool] | None = None,
    forward: Mapping[int, int] | None = None,
) -> tuple[dict[int, ChannelState], list[ChannelSite]] | None:
    """:func:`trace_channels` on a flat program, with the state of every value reached.

    Args:
      program: the flat :class:`~asgssd_jax.trace.Program`.
      concat_op, operand: the concatenate operation and the operand slot to follow.
      data: the data variables (default ``program.data``).
      outputs: variables the channels must not reach (default the program's outputs).
      skip: operations to pass over (e.g. ones a rewrite removes).
      forward: operation -> variable it returns unchanged (e.g. a bypassed joint).

    Returns:
      ``(states, sites)``: the :class:`ChannelState` of each value carrying the channels and the
      contractions consuming them; None when the channels reach anything else.
    """
    data = program.data if data is None else data
    if outputs is None:
        outputs = {x for x in program.outvars if isinstance(x, int)}
    forward = forward or {}
    op = program.ops[concat_op]
    axis = op.params["dimension"]
    before = sum(_shape_of(program, x)[axis] for x in op.invars[:operand])
    width = _shape_of(program, op.invars[operand])[axis]
    out = op.outvars[0]
    if out in outputs:
        return None
    total = program.shape(out)[axis]
    tracked = {out: ChannelState(axis, 1, total, before, width)}
    sites: list[ChannelSite] = []
    heap = list(program.consumers.get(out, ()))
    heapq.heapify(heap)
    done: set[int] = set()
    while heap:
        i = heapq.heappop(heap)
        if i in done:
            continue
        done.add(i)
        if skip is not None and skip(i):
            continue
        if i in forward:
            if forward[i] not in tracked:
                continue
            nxt = tracked[forward[i]]
        else:
            nxt = _advance(program.ops[i], program, tracked, data)
        if nxt is None:
            return None
        if isinstance(nxt, ChannelSite):
            sites.append(nxt)
            continue
        for o in program.ops[i].outvars:
            tracked[o] = nxt
            if o in outputs:
                return None
            for c in program.consumers.get(o, ()):
                heapq.heappush(heap, c)
    return tracked, sites


# --------------------------------------------------------------------------------------------
# The search space.


@dataclasses.dataclass(frozen=True)
class GroupSlice:
    """Part of one variables leaf in a group: the whole leaf (``axis`` None), or the entries
    ``indices`` along ``axis`` (one layer of a scanned stack: axis 0, one index)."""

    leaf: int  # index into the variables' leaves
    path: str  # the leaf's "/"-joined path
    axis: int | None = None
    indices: tuple[int, ...] = ()

    def __str__(self) -> str:
        return slice_path(self.path, self.axis, self.indices)


@dataclasses.dataclass(frozen=True)
class Group:
    """One removal structure of G_s and its trainable variables.

    ``slices`` says which part of which leaf belongs to the group; ``leaves`` are the distinct
    leaves it touches and ``param_paths`` reads each slice as ``path`` (whole leaf) or
    ``path[3]`` (index 3 along axis 0).
    """

    index: int
    segment: int
    leaves: tuple[int, ...]  # indices into the variables' leaves
    param_paths: tuple[str, ...]
    num_params: int
    macs: float  # per example, of the structure's own operations
    concat_sites: tuple[ChannelSite, ...] = ()
    slices: tuple[GroupSlice, ...] = ()

    def __post_init__(self):
        if not self.slices:  # whole leaves
            object.__setattr__(self, "slices", tuple(
                GroupSlice(i, p) for i, p in zip(self.leaves, self.param_paths)))


@dataclasses.dataclass(frozen=True)
class LeafGroupMap:
    """Which groups own the entries of one leaf.

    ``axis`` None: the whole leaf belongs to group ``ids[0]`` (-1: G_s^C). Otherwise entry
    ``j`` along ``axis`` belongs to group ``ids[j]`` (-1: G_s^C); one leaf is split along one
    axis at most. Per-group sums of a leaf are then a reduction over the other axes followed
    by a segment sum over ``ids``, and per-group scalars reach a leaf as ``values[ids]``
    broadcast along ``axis``.
    """

    axis: int | None
    ids: np.ndarray  # int32

    @property
    def whole(self) -> int | None:
        """The group owning the whole leaf (-1 for G_s^C), or None for a split leaf."""
        return int(self.ids[0]) if self.axis is None else None

    @property
    def grouped(self) -> bool:
        return bool(np.any(self.ids >= 0))

    def mask(self, chosen: np.ndarray, ndim: int) -> np.ndarray:
        """Boolean array broadcastable to the leaf: True where the owning group is in
        ``chosen`` (a boolean array over groups)."""
        padded = np.concatenate([np.asarray(chosen, bool), [False]])
        return padded[self.ids].reshape(self._shape(ndim))  # -1 reads the padded False

    def take(self, values: jax.Array, fill: Any, ndim: int) -> jax.Array:
        """Per-group ``values[G]`` read for each entry, broadcastable to the leaf; ``fill``
        where no group owns the entry (jittable)."""
        padded = jnp.concatenate([values, jnp.full((1,), fill, values.dtype)])
        return padded[jnp.asarray(self.ids)].reshape(self._shape(ndim))

    def _shape(self, ndim: int) -> tuple[int, ...]:
        """The shape that broadcasts one value per entry along ``axis`` to the leaf."""
        if self.axis is None:
            return ()
        shape = [1] * ndim
        shape[self.axis] = len(self.ids)
        return tuple(shape)

    def group_sums(self, x: jax.Array, num_groups: int) -> jax.Array:
        """``float32[G]``: the sum of ``x`` (the leaf, or a product of leaves) over each group's
        entries (jittable)."""
        x = x.astype(jnp.float32)
        if self.axis is None:
            g = int(self.ids[0])
            out = jnp.zeros(num_groups, jnp.float32)
            return out if g < 0 else out.at[g].set(jnp.sum(x))
        other = tuple(a for a in range(x.ndim) if a != self.axis)
        return self.slice_sums(jnp.sum(x, axis=other), num_groups)

    def slice_sums(self, per: jax.Array, num_groups: int) -> jax.Array:
        """``[..., G]``: values ``per[..., j]`` of the slices along ``axis`` summed by the
        group owning each slice (G_s^C's slices are dropped; jittable)."""
        ids = np.where(self.ids >= 0, self.ids, num_groups)
        sums = jax.ops.segment_sum(jnp.moveaxis(per, -1, 0), ids, num_groups + 1)
        return jnp.moveaxis(sums[:num_groups], 0, -1)


@dataclasses.dataclass(frozen=True)
class ExcludedCandidate:
    """A segment that passed the graph tests but is not zero-invariant, so not in G_s."""

    segment: int
    param_paths: tuple[str, ...]
    reason: str


class SearchSpace:
    """Removal structures of a network, their groups, and graph validity.

    Build it with :func:`generate_search_space`. ``groups[i]`` is the i-th group of G_s;
    ``complement_paths`` lists the trainable leaves in G_s^C; ``excluded`` lists the candidates
    that failed the zero-invariance check, with the reason.
    """

    def __init__(self, segment_graph: SegmentGraph, groups: list[Group], apply_fn, kwargs,
                 variables=None, excluded: Sequence[ExcludedCandidate] = ()):
        self.excluded: tuple[ExcludedCandidate, ...] = tuple(excluded)
        self.variables = variables  # the tree it was traced with (for NNX models: their dict)
        self.segment_graph = segment_graph
        self.trace: TraceGraph = segment_graph.trace
        self.groups: tuple[Group, ...] = tuple(groups)
        self.apply_fn = apply_fn
        self.apply_kwargs = dict(kwargs)
        t = self.trace
        grouped = {i for gr in groups for i in gr.leaves}
        #: trainable leaves no group touches (leaves split between groups and G_s^C are not
        #: among them: :meth:`leaf_group_maps` tells which of their entries are in G_s^C)
        self.complement_leaves: tuple[int, ...] = tuple(
            i for i, tr in enumerate(t.trainable) if tr and i not in grouped)
        self.group_of_segment = {gr.segment: gr.index for gr in groups}
        self._prepare_validity()

    # -- basic facts ---------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        """|G_s|, the number of removal structures."""
        return len(self.groups)

    @property
    def leaf_paths(self) -> list[str]:
        return self.trace.leaf_paths

    @property
    def complement_paths(self) -> tuple[str, ...]:
        """Paths of the trainable leaves in G_s^C."""
        return tuple(self.trace.leaf_paths[i] for i in self.complement_leaves)

    def __repr__(self) -> str:
        return (f"SearchSpace(num_groups={self.num_groups}, trace={self.trace!r}, "
                f"segments={self.segment_graph.graph.number_of_nodes()})")

    # -- validity ----------------------------------------------------------------------------
    def _prepare_validity(self) -> None:
        sg = self.segment_graph
        self.io_pairs: tuple[tuple[int, int], ...] = tuple(io_pairs(sg))
        order = list(nx.topological_sort(sg.graph))
        self._topo = order
        sources = list(dict.fromkeys(s for s, _ in self.io_pairs))
        n = len(sg.segments)
        pos = {s: i for i, s in enumerate(order)}
        max_deg = max([sg.graph.in_degree(s) for s in order] + [1])
        preds = np.full((n, max_deg), -1, dtype=np.int32)
        for s in order:
            ps = [pos[p] for p in sg.graph.predecessors(s)]
            preds[pos[s], : len(ps)] = ps
        self._preds_topo = preds
        column = np.full(n, -1, np.int32)
        column[[pos[s] for s in sources]] = np.arange(len(sources))
        self._source_column_topo = column
        self._num_sources = len(sources)
        self._pair_target_topo = np.array([pos[t] for _, t in self.io_pairs], np.int32)
        self._pair_column = np.array([sources.index(s) for s, _ in self.io_pairs], np.int32)
        group_topo = np.full(n, len(self.groups), dtype=np.int32)
        for gr in self.groups:
            group_topo[pos[gr.segment]] = gr.index
        self._group_topo = group_topo

    def _check_indices(self, indices: Iterable[int]) -> list[int]:
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < self.num_groups]
        if bad:
            raise IndexError(f"group indices {bad} out of range: the space has "
                             f"{self.num_groups} groups (0..{self.num_groups - 1})")
        return idx

    def is_valid(self, indices: Iterable[int]) -> bool:
        """Whether removing the groups ``indices`` keeps every input-output pair connected.

        Host function; O(P (|V_s| + |E_s|)) for P inputs. A removed structure outputs a constant
        (zero), so a joint left with constant inputs only becomes constant. The set is valid iff
        every (input leaf, output leaf) pair connected in the full network (``io_pairs``) is
        still connected; with one input and one output this is Algorithm 3, line 8.
        """
        removed = {self.groups[i].segment for i in self._check_indices(indices)}
        return pairs_stay_connected(self.segment_graph.graph, self.io_pairs, removed)

    def is_valid_mask(self, removed: jax.Array) -> jax.Array:
        """``is_valid`` for a boolean mask over groups, usable inside ``jit``/``pmap``.

        One ``lax.fori_loop`` over the segments in topological order, carrying which inputs
        reach each segment: O(|V_s| * max in-degree * inputs).
        """
        removed = jnp.asarray(removed, dtype=bool).reshape(-1)
        if removed.shape[0] != self.num_groups:
            raise ValueError(f"mask has {removed.shape[0]} entries; the space has "
                             f"{self.num_groups} groups")
        # index num_groups (a padded False) stands for "not a removal structure"
        padded = jnp.concatenate([removed, jnp.zeros(1, bool)])
        dead = padded[jnp.asarray(self._group_topo)]
        return pairs_connected(jnp.asarray(self._preds_topo), jnp.asarray(self._source_column_topo),
                               dead, jnp.asarray(self._pair_target_topo),
                               jnp.asarray(self._pair_column), self._num_sources)

    # -- variables -----------------------------------------------------------------------------
    def _leaves(self, variables: Any) -> list[Any]:
        leaves = jax.tree_util.tree_leaves(variables)
        if len(leaves) == len(self.trace.leaf_paths):
            return leaves
        raise ValueError(
            f"variables have {len(leaves)} leaves but the search space was traced with "
            f"{len(self.trace.leaf_paths)}; pass the same variables tree (all collections) that "
            "generate_search_space saw"
        )

    def _match_paths(self, tree: Any) -> list[int]:
        """Index in the traced variables of each leaf of ``tree`` (matched by path)."""
        from asgssd_jax.trace import leaf_path

        index = {p: i for i, p in enumerate(self.trace.leaf_paths)}
        flat, _ = jax.tree_util.tree_flatten_with_path(tree)
        paths = [leaf_path(p) for p, _ in flat]
        prefix = ""
        if paths and paths[0] not in index:
            for cand in ("params/", "state/"):
                if all(cand + p in index for p in paths):
                    prefix = cand
                    break
            else:
                missing = [p for p in paths if p not in index][:3]
                raise ValueError(
                    f"tree leaves {missing} are not in the search space's variables; pass the "
                    "variables (or their 'params' collection) the space was generated from")
        return [index.get(prefix + p, -1) for p in paths]

    def _maps_by_leaf(self) -> dict[int, LeafGroupMap]:
        maps = getattr(self, "_leaf_maps_cache", None)
        if maps is None:
            maps = {}
            split: dict[int, tuple[int, np.ndarray]] = {}
            for gr in self.groups:
                for sl in gr.slices:
                    if sl.axis is None:
                        maps[sl.leaf] = LeafGroupMap(None, np.array([gr.index], np.int32))
                        continue
                    size = self._leaf_shape(sl.leaf)[sl.axis]
                    axis, ids = split.setdefault(
                        sl.leaf, (sl.axis, np.full(size, -1, np.int32)))
                    if axis != sl.axis:
                        raise ValueError(f"leaf {sl.path} is split along two axes")
                    ids[list(sl.indices)] = gr.index
            for leaf, (axis, ids) in split.items():
                maps[leaf] = LeafGroupMap(axis, ids)
            self._leaf_maps_cache = maps
        return maps

    def leaf_group_maps(self, tree: Any) -> list[LeafGroupMap]:
        """Which groups own the entries of each leaf of ``tree`` (flattening order).

        ``tree`` may be the full variables or a sub-tree such as ``variables["params"]``;
        leaves are matched by path. A leaf outside G_s gets ``LeafGroupMap(None, [-1])``.
        """
        maps = self._maps_by_leaf()
        outside = LeafGroupMap(None, np.array([-1], np.int32))
        return [maps.get(i, outside) for i in self._match_paths(tree)]

    def leaf_groups(self, tree: Any) -> list[int]:
        """Group index of each leaf of ``tree`` that one group owns whole, -1 for the others
        (leaves in G_s^C, and leaves split between groups: see :meth:`leaf_group_maps`).

        ``tree`` may be the full variables or a sub-tree such as ``variables["params"]``; leaves
        are matched by path.
        """
        return [m.whole if m.axis is None else -1 for m in self.leaf_group_maps(tree)]

    def zero_groups(self, variables: Any, indices: Iterable[int]) -> Any:
        """``variables`` with every entry of the groups ``indices`` set to 0 (a new tree)."""
        idx = self._check_indices(indices)
        chosen = np.zeros(self.num_groups, bool)
        chosen[idx] = True
        maps = self.leaf_group_maps(variables)
        leaves, treedef = jax.tree_util.tree_flatten(variables)
        out = []
        for x, m in zip(leaves, maps):
            hit = m.mask(chosen, np.ndim(x))
            if not hit.any():
                out.append(x)
            elif m.axis is None:
                out.append(jnp.zeros_like(x))
            else:
                out.append(jnp.where(hit, jnp.zeros((), x.dtype), x))
        return jax.tree_util.tree_unflatten(treedef, out)

    def group_norms(self, variables: Any) -> jax.Array:
        """L2 norm of each group, shape ``[num_groups]`` (jittable)."""
        maps = self.leaf_group_maps(variables)
        leaves = jax.tree_util.tree_leaves(variables)
        sq = jnp.zeros(self.num_groups, jnp.float32)
        for x, m in zip(leaves, maps):
            if m.grouped:
                sq = sq + m.group_sums(jnp.square(jnp.asarray(x, jnp.float32)), self.num_groups)
        return jnp.sqrt(sq)

    def zero_group_indices(self, variables: Any) -> list[int]:
        """Groups whose entries are all exactly zero in ``variables`` (host)."""
        maps = self.leaf_group_maps(variables)
        leaves = jax.tree_util.tree_leaves(variables)
        nonzero = np.zeros(self.num_groups, bool)
        for x, m in zip(leaves, maps):
            if not m.grouped:
                continue
            x = np.asarray(x)
            if m.axis is None:
                nonzero[m.whole] |= bool(np.any(x != 0))
                continue
            other = tuple(a for a in range(x.ndim) if a != m.axis)
            per = np.any(x != 0, axis=other)
            for j in np.flatnonzero(per & (m.ids >= 0)):
                nonzero[m.ids[j]] = True
        return [i for i in range(self.num_groups) if not nonzero[i]]

    # -- reporting -----------------------------------------------------------------------------
    def summary(self) -> str:
        """A table: group, segment, params, MACs; then G_s^C's size."""
        sg = self.segment_graph
        rows = [("group", "segment", "params", "MACs", "operators")]
        for gr in self.groups:
            seg = sg.segments[gr.segment]
            mods = []
            for v in seg.vertices:
                m = self.trace.vertices[v].module or operation_name(self.trace, v)
                if m not in mods:
                    mods.append(m)
            rows.append((f"g{gr.index}", str(gr.segment), f"{gr.num_params:,}",
                         _human(gr.macs), ", ".join(mods)))
        widths = [max(len(r[c]) for r in rows) for c in range(4)]
        lines = []
        for k, r in enumerate(rows):
            lines.append("  ".join(r[c].ljust(widths[c]) if c in (0, 4) or k == 0
                                   else r[c].rjust(widths[c]) for c in range(4)) + "  " + r[4])
            if k == 0:
                lines.append("-" * (sum(widths) + 8 + len(r[4])))
        n_c = sum(int(np.prod(self._leaf_shape(i))) for i, tr in enumerate(self.trace.trainable)
                  if tr) - sum(g.num_params for g in self.groups)
        lines.append(
            f"{self.num_groups} removal structures in G_s "
            f"({sum(g.num_params for g in self.groups):,} params); "
            f"G_s^C: {len(self.complement_leaves)} leaves ({n_c:,} params); segment graph "
            f"|V_s|={sg.graph.number_of_nodes()}, |E_s|={sg.graph.number_of_edges()}")
        for ex in self.excluded:
            lines.append(f"excluded segment {ex.segment} ({', '.join(ex.param_paths)}): "
                         f"not a removal structure, {ex.reason}")
        return "\n".join(lines)

    def _leaf_shape(self, i: int) -> tuple[int, ...]:
        return self.trace.program.shape(self.trace.program.leaf_vars[i])


def io_pairs(segment_graph: SegmentGraph) -> list[tuple[int, int]]:
    """(input segment, segment producing an output leaf) pairs connected in the full network.

    Every output leaf computed from an input is produced by the tail of one segment; validity
    requires each such pair to stay connected. O(inputs * (|V_s| + |E_s|)).
    """
    sg = segment_graph
    t = sg.trace
    prog = t.program
    targets: list[int] = []
    for x in prog.outvars:
        if isinstance(x, int) and x in prog.data and x in prog.producer:
            targets.append(sg.segment_of[t.vertex_of_op[prog.producer[x]]])
    targets = list(dict.fromkeys(targets))
    pairs = []
    for s in sg.inputs:
        below = nx.descendants(sg.graph, s)
        pairs.extend((s, tgt) for tgt in targets if tgt in below)
    return pairs


def pairs_stay_connected(graph: nx.DiGraph, pairs: Iterable[tuple[Any, Any]],
                         removed: set[Any]) -> bool:
    """Whether every (source, target) pair of ``graph`` stays connected with the ``removed``
    nodes deleted. Host function, O(sources * (|V| + |E|))."""
    targets: dict[Any, set[Any]] = {}
    for s, t in pairs:
        targets.setdefault(s, set()).add(t)
    for source, needed in targets.items():
        seen = {source}
        stack = [source]
        while stack:
            for w in graph.successors(stack.pop()):
                if w not in seen and w not in removed:
                    seen.add(w)
                    stack.append(w)
        if not needed <= seen:
            return False
    return True


def pairs_connected(preds: jax.Array, source_column: jax.Array, dead: jax.Array,
                    pair_target: jax.Array, pair_column: jax.Array,
                    num_sources: int) -> jax.Array:
    """Whether every pair stays connected with the ``dead`` nodes deleted (jittable).

    Nodes are numbered in a topological order. ``preds[i]``: predecessors of node ``i`` padded
    with -1; ``source_column[i]``: the column of node ``i`` if it is a source, else -1; pair ``p``
    needs node ``pair_target[p]`` reached from the source of column ``pair_column[p]``, one of
    ``num_sources`` columns. One ``lax.fori_loop`` over the nodes, O(|V| * max in-degree * sources).
    """
    n = preds.shape[0]
    width = max(num_sources, 1)
    columns = jnp.arange(width)

    def body(i, reach):
        p = preds[i]
        from_preds = jnp.any(jnp.where((p >= 0)[:, None], reach[jnp.maximum(p, 0)], False), 0)
        row = ((source_column[i] == columns) | from_preds) & ~dead[i]
        return reach.at[i].set(row)

    reach = jax.lax.fori_loop(0, n, body, jnp.zeros((n, width), bool))
    return jnp.all(reach[pair_target, pair_column])


def _human(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def discover_removal_structures(
    segment_graph: SegmentGraph, leaves: Sequence[Any] | None = None
) -> tuple[list[Group], list[ExcludedCandidate]]:
    """Algorithm 2, lines 11-15: the segments that qualify as removal structures.

    A segment that passes the graph tests but is not zero-invariant
    (:func:`~asgssd_jax.zero_invariance.check_zero_invariance`, evaluated with ``leaves``, the
    variables' leaves, concrete or abstract) is returned among the excluded candidates instead.
    """
    t = segment_graph.trace
    g = t.graph
    program = t.program
    # How many segments use each unit (weight sharing makes a unit non-removable); a segment
    # reading a whole leaf shares it with every segment reading a slice of it.
    users: dict[int, int] = {}
    whole_users: dict[int, int] = {}
    slice_users: dict[int, int] = {}
    for seg in segment_graph.segments:
        for u in seg.leaves:
            users[u] = users.get(u, 0) + 1
        for leaf in {t.unit_leaf(u) for u in seg.leaves if t.units[u][1] is None}:
            whole_users[leaf] = whole_users.get(leaf, 0) + 1
        for leaf in {t.unit_leaf(u) for u in seg.leaves if t.units[u][1] is not None}:
            slice_users[leaf] = slice_users.get(leaf, 0) + 1

    def shared(u: int) -> bool:
        leaf, axis, _ = t.units[u]
        if axis is None:
            return users[u] > 1 or slice_users.get(leaf, 0) > 0
        return users[u] > 1 or whole_users.get(leaf, 0) > 0
    batch = program.shape(program.arg_vars[0])[0] if program.shape(program.arg_vars[0]) else 1
    groups: list[Group] = []
    excluded: list[ExcludedCandidate] = []
    for seg in segment_graph.segments:
        if seg.kind != "op":
            continue
        trainable = sorted((u for u in seg.leaves if t.unit_trainable(u)),
                           key=lambda u: tuple(-1 if a is None else a for a in t.units[u]))
        if not trainable or any(shared(u) for u in trainable):
            continue
        if any(p in CONTROL_FLOW for v in seg.vertices for p in t.vertices[v].primitives):
            continue  # control flow is never inside a removal structure
        tail = seg.vertices[-1]
        succs = list(g.successors(tail))
        if not succs or not all(t.is_tolerant_joint(w) for w in succs):
            continue
        sites: list = []
        ok = True
        tail_outs = {o for i in t.vertices[tail].ops for o in program.ops[i].outvars}
        for w in succs:
            op = program.ops[t.vertices[w].ops[0]]
            if op.name != "concatenate":
                continue
            for k, x in enumerate(op.invars):
                if isinstance(x, int) and x in tail_outs:
                    found = trace_channels(t, op.index, k)
                    if found is None:
                        ok = False
                        break
                    sites.extend(found)
            if not ok:
                break
        if not ok:
            continue
        ops = sorted(i for v in seg.vertices for i in t.vertices[v].ops)
        whole = [t.unit_leaf(u) for u in trainable if t.units[u][1] is None]
        sliced = [o for u in trainable if t.units[u][1] is not None
                  for i in t.unit_ops[u] for o in program.ops[i].outvars]
        reason = check_zero_invariance(program, ops, whole, leaves, seed=seg.id,
                                       zero_vars=sliced)
        if reason is not None:
            excluded.append(ExcludedCandidate(
                seg.id, tuple(t.unit_path(u) for u in trainable), reason))
            continue
        macs = sum(op_macs(program.ops[i], program) for i in ops) / batch
        slices = tuple(
            GroupSlice(t.unit_leaf(u), t.leaf_paths[t.unit_leaf(u)], t.units[u][1],
                       () if t.units[u][1] is None else (t.units[u][2],))
            for u in trainable)
        groups.append(Group(
            index=len(groups),
            segment=seg.id,
            leaves=tuple(sorted({t.unit_leaf(u) for u in trainable})),
            param_paths=tuple(t.unit_path(u) for u in trainable),
            num_params=int(sum(t.unit_size(u) for u in trainable)),
            macs=macs,
            concat_sites=tuple(sites),
            slices=slices,
        ))
    return groups, excluded


def generate_search_space(
    apply_fn: Callable[..., Any], variables: Any, *sample_args: Any, **sample_kwargs: Any
) -> SearchSpace:
    """Traces ``apply_fn(variables, *sample_args, **sample_kwargs)`` and returns its search space.

    ``apply_fn`` is a linen ``model.apply``, any pure function of a parameter tree, or an
    ``nnx.Module`` with ``variables=None``. Keyword arguments are static (pass ``train=False``
    for inference mode where the model takes it).
    """
    if _is_nnx(apply_fn):
        from asgssd_jax.trace import nnx_functional

        if variables is not None:
            from asgssd_jax.trace import TraceError

            raise TraceError("pass an nnx.Module as apply_fn with variables=None")
        apply_fn, variables = nnx_functional(apply_fn)
    t = trace(apply_fn, variables, *sample_args, **sample_kwargs)
    sg = build_segment_graph(t)
    groups, excluded = discover_removal_structures(sg, jax.tree_util.tree_leaves(variables))
    return SearchSpace(sg, groups, apply_fn, sample_kwargs, variables, excluded)


def _is_nnx(obj: Any) -> bool:
    from asgssd_jax.trace import _is_nnx_module

    return _is_nnx_module(obj)
