"""Random DAG networks for property tests (hypothesis strategies).

A network is a tuple of nodes ``(kind, inputs, channels)``; input index -1 is the image. Unary
blocks (conv-BN, pool-conv, dense over channels, activations, pools, dropout, an ``nn.scan``
over two residual conv-BN-dropout layers) and joins (add, sub, concat) are wired at random;
nodes that the head does not use remain as dead branches.

:func:`random_container` draws the kind of pytree the variables live in (linen's dict of
collections, a flat dict, a tuple, a list, a dataclass, a custom registered node), and
:func:`in_container` turns a linen network into a plain ``apply_fn`` of that container.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from hypothesis import strategies as st

UNARY = ("conv_bn", "conv_relu", "maxpool_conv", "dense", "relu", "avgpool", "conv_bias_sigmoid",
         "dropout", "scan_res")
JOINS = ("add", "sub", "concat")
HEADS = ("gap", "flatten", "concat_bn_gap", "flatten_bn")
INPUT_SHAPE = (6, 6, 3)


class _ResLayer(nn.Module):
    """One layer of a scanned stack: ``x + dropout(relu(bn(conv(x))))``."""

    train: bool

    @nn.compact
    def __call__(self, x, _):
        h = nn.Conv(x.shape[-1], (3, 3), use_bias=False)(x)
        h = nn.BatchNorm(use_running_average=not self.train, momentum=0.9)(h)
        return x + nn.Dropout(0.25, deterministic=not self.train)(jax.nn.relu(h)), None


class RandomNet(nn.Module):
    nodes: tuple  # ((kind, inputs, channels), ...)
    head: str = "gap"
    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train: bool = False):
        vals = [x]

        def bn(h):
            return nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)

        for kind, ins, ch in self.nodes:
            xs = [vals[j + 1] for j in ins]
            h = xs[0]
            if kind == "conv_bn":
                h = bn(nn.Conv(ch, (3, 3), use_bias=False)(h))
            elif kind == "conv_relu":
                h = jax.nn.relu(nn.Conv(ch, (3, 3))(h))
            elif kind == "maxpool_conv":
                h = nn.max_pool(h, (3, 3), strides=(1, 1), padding="SAME")
                h = bn(nn.Conv(ch, (1, 1), use_bias=False)(h))
            elif kind == "dense":
                h = nn.Dense(ch)(h)
            elif kind == "relu":
                h = jax.nn.relu(h)
            elif kind == "dropout":
                h = nn.Dropout(0.25, deterministic=not train)(h)
            elif kind == "scan_res":
                stack = nn.scan(_ResLayer, variable_axes={"params": 0, "batch_stats": 0},
                                split_rngs={"params": True, "dropout": True}, length=2)
                h = stack(train)(h, None)[0]
            elif kind == "avgpool":
                h = nn.avg_pool(h, (3, 3), strides=(1, 1), padding="SAME")
            elif kind == "conv_bias_sigmoid":
                h = jax.nn.sigmoid(nn.Conv(ch, (1, 1))(h))
            elif kind == "add":
                h = sum(xs[1:], xs[0])
            elif kind == "sub":
                h = xs[0] - xs[1]
            elif kind == "concat":
                h = jnp.concatenate(xs, axis=-1)
            else:  # pragma: no cover
                raise ValueError(kind)
            vals.append(h)
        h = vals[-1]
        if self.head == "gap":
            h = jnp.mean(h, axis=(1, 2))
        elif self.head == "flatten":
            h = h.reshape(h.shape[0], -1)
        elif self.head == "concat_bn_gap":
            h = jnp.mean(jax.nn.relu(bn(h)), axis=(1, 2))
        elif self.head == "flatten_bn":
            h = bn(h).reshape(h.shape[0], -1)
        return nn.Dense(self.num_classes)(h)


def _channels(nodes, j):
    return INPUT_SHAPE[-1] if j < 0 else nodes[j][2]


@st.composite
def random_nodes(draw, min_nodes: int = 2, max_nodes: int = 9):
    n = draw(st.integers(min_nodes, max_nodes))
    nodes: list[tuple] = []
    for i in range(n):
        kind = draw(st.sampled_from(UNARY + JOINS + JOINS))  # joins twice as likely
        earlier = list(range(-1, i))
        if kind in ("add", "sub"):
            ch = draw(st.sampled_from([_channels(nodes, j) for j in earlier]))
            same = [j for j in earlier if _channels(nodes, j) == ch]
            if len(same) >= 2:
                k = 2 if kind == "sub" else draw(st.integers(2, min(3, len(same))))
                ins = tuple(draw(st.permutations(same))[:k])
                nodes.append((kind, ins, ch))
                continue
            kind = "conv_bn"
        if kind == "concat":
            if len(earlier) >= 2:
                k = draw(st.integers(2, min(3, len(earlier))))
                ins = tuple(draw(st.permutations(earlier))[:k])
                nodes.append((kind, ins, sum(_channels(nodes, j) for j in ins)))
                continue
            kind = "conv_bn"
        # unary: prefer recent nodes so that graphs are deep, not only wide
        j = draw(st.sampled_from(earlier[-3:] if draw(st.booleans()) else earlier))
        if kind in ("relu", "avgpool", "dropout", "scan_res"):
            ch = _channels(nodes, j)
        else:
            ch = draw(st.sampled_from([2, 3, 4]))
        nodes.append((kind, (j,), ch))
    return tuple(nodes)


@st.composite
def random_network(draw, min_nodes: int = 2, max_nodes: int = 9):
    """A strategy for ``(linen module, per-example input shape)``."""
    nodes = draw(random_nodes(min_nodes, max_nodes))
    head = draw(st.sampled_from(HEADS))
    return RandomNet(nodes=nodes, head=head), INPUT_SHAPE


def init_random(module, input_shape, seed: int = 0, batch: int = 2):
    """Initialises with non-trivial BatchNorm statistics so tests see real per-channel ops."""
    x = jnp.ones((batch, *input_shape), jnp.float32)
    variables = module.init(jax.random.key(seed), x)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
    key = jax.random.key(seed + 1)
    out = []
    for k, (path, leaf) in enumerate(leaves):
        names = [getattr(p, "key", "") for p in path]
        sub = jax.random.fold_in(key, k)
        if "batch_stats" in names:
            if names[-1] == "var":
                leaf = 0.5 + jax.random.uniform(sub, leaf.shape)
            else:
                leaf = 0.1 * jax.random.normal(sub, leaf.shape)
        elif names[-1] in ("scale", "bias"):
            base = 1.0 if names[-1] == "scale" else 0.0
            leaf = base + 0.1 * jax.random.normal(sub, leaf.shape)
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------------------------
# Containers: the variables as the pytree a user may bring.

CONTAINERS = ("linen", "flat_dict", "tuple", "list", "dataclass", "custom_node")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Packed:
    """A dataclass pytree node: parameters and state as tuples of leaves."""

    params: tuple
    state: tuple


class Node:
    """A custom registered pytree node (like an equinox module) holding a list of leaves."""

    def __init__(self, leaves, tag="node"):
        self.leaves = list(leaves)
        self.tag = tag


jax.tree_util.register_pytree_node(
    Node, lambda n: (n.leaves, n.tag), lambda tag, leaves: Node(leaves, tag))


def random_container():
    return st.sampled_from(CONTAINERS)


def in_container(module, variables, kind: str):
    """``(apply_fn, packed)``: ``module.apply`` as a plain function of ``variables`` packed as
    ``kind`` (``"linen"``: the module's own apply and variables)."""
    if kind == "linen":
        return module.apply, variables
    flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
    leaves = [x for _, x in flat]
    is_param = [getattr(p[0], "key", None) == "params" for p, _ in flat]
    if kind == "flat_dict":
        names = ["/".join(str(getattr(k, "key", k)) for k in p) for p, _ in flat]
        packed = dict(zip(names, leaves))
        unpack = lambda v: [v[n] for n in names]  # noqa: E731
    elif kind in ("tuple", "list"):
        packed = tuple(leaves) if kind == "tuple" else list(leaves)
        unpack = list
    elif kind == "dataclass":
        packed = Packed(tuple(x for x, p in zip(leaves, is_param) if p),
                        tuple(x for x, p in zip(leaves, is_param) if not p))

        def unpack(v):
            params, state = iter(v.params), iter(v.state)
            return [next(params) if p else next(state) for p in is_param]
    elif kind == "custom_node":
        packed = Node(leaves)
        unpack = lambda v: v.leaves  # noqa: E731
    else:  # pragma: no cover
        raise ValueError(kind)

    def apply_fn(v, x, train: bool = False):
        return module.apply(jax.tree_util.tree_unflatten(treedef, unpack(v)), x, train=train)

    return apply_fn, packed
