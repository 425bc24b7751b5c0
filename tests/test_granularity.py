"""Granularity of transformer removal structures: a branch's group holds its norm (scale and
bias) and every projection, whatever the attention and MLP are written with."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import asgssd_jax as ag

D, HEADS, T = 16, 4, 6


def rope(x):
    """Rotary position embedding of ``x: [B, T, heads, head_dim]`` (rotate-half form)."""
    hd = x.shape[-1]
    angle = jnp.arange(x.shape[1])[:, None] / 10000 ** (jnp.arange(0, hd, 2) / hd)
    cos = jnp.tile(jnp.cos(angle), 2)[None, :, None, :]
    sin = jnp.tile(jnp.sin(angle), 2)[None, :, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + jnp.concatenate([-x2, x1], -1) * sin


class LinenPreNorm(nn.Module):
    """flax's MultiHeadDotProductAttention and a tanh-GELU MLP, LayerNorm before each."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(h)
        h = nn.gelu(nn.Dense(2 * D, name="up")(nn.LayerNorm(name="ln2")(x)), approximate=True)
        return x + nn.Dense(D, name="down")(h)


class EinsumLlama(nn.Module):
    """Hand-written attention with separate q/k/v, RMSNorm, RoPE, grouped-query (``kv_heads``
    < heads; 1 is multi-query), causal mask, SwiGLU."""

    kv_heads: int = 2

    @nn.compact
    def __call__(self, x):
        hd = D // HEADS
        h = nn.RMSNorm(name="attn_norm")(x)
        q = rope(nn.DenseGeneral((HEADS, hd), use_bias=False, name="q")(h))
        k = rope(nn.DenseGeneral((self.kv_heads, hd), use_bias=False, name="k")(h))
        v = nn.DenseGeneral((self.kv_heads, hd), use_bias=False, name="v")(h)
        k = jnp.repeat(k, HEADS // self.kv_heads, axis=2)
        v = jnp.repeat(v, HEADS // self.kv_heads, axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(hd)
        s = jnp.where(jnp.tril(jnp.ones((x.shape[1],) * 2, bool)), s, -1e9)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)
        x = x + nn.DenseGeneral(D, axis=(-2, -1), use_bias=False, name="o")(o)
        h = nn.RMSNorm(name="mlp_norm")(x)
        gate = nn.Dense(2 * D, use_bias=False, name="gate")(h)
        up = nn.Dense(2 * D, use_bias=False, name="up")(h)
        return x + nn.Dense(D, use_bias=False, name="down")(nn.silu(gate) * up)


class FusedQKV(nn.Module):
    """One qkv projection split into heads."""

    @nn.compact
    def __call__(self, x):
        hd = D // HEADS
        qkv = nn.Dense(3 * D, name="qkv")(nn.LayerNorm(name="ln1")(x))
        qkv = qkv.reshape(*x.shape[:2], 3, HEADS, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(hd), -1)
        x = x + nn.Dense(D, name="proj")(jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(x.shape))
        h = nn.gelu(nn.Dense(2 * D, name="fc1")(nn.LayerNorm(name="ln2")(x)))
        return x + nn.Dense(D, name="fc2")(h)


class PostNorm(nn.Module):
    """BERT-style: the norms sit on the residual stream, after each sum."""

    @nn.compact
    def __call__(self, x):
        attn = nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(x)
        x = nn.LayerNorm(name="ln1")(x + attn)
        h = nn.Dense(D, name="down")(nn.gelu(nn.Dense(2 * D, name="up")(x)))
        return nn.LayerNorm(name="ln2")(x + h)


class Parallel(nn.Module):
    """GPT-J-style: attention and MLP side by side on one shared norm."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="ln")(x)
        a = nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(h)
        m = nn.Dense(D, name="down")(nn.gelu(nn.Dense(2 * D, name="up")(h)))
        return x + a + m


class Net(nn.Module):
    """Embedding, two blocks, final norm and a head."""

    block: type
    kwargs: tuple = ()

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(D, name="embed")(x)
        for i in range(2):
            x = self.block(name=f"block{i}", **dict(self.kwargs))(x)
        return nn.Dense(3, name="head")(nn.LayerNorm(name="ln_f")(x).mean(axis=1))


def _attention(prefix, norm="ln1", projections=("query", "key", "value", "out")):
    paths = {f"{prefix}/{norm}/scale", f"{prefix}/{norm}/bias"} if norm else set()
    for p in projections:
        paths |= {f"{prefix}/attn/{p}/kernel", f"{prefix}/attn/{p}/bias"}
    return paths


def _contents(space):
    return [{p.removeprefix("params/") for p in g.param_paths} for g in space.groups]


def _linen_space(block, **kwargs):
    x = jax.random.normal(jax.random.key(1), (2, T, D))
    m = Net(block, tuple(kwargs.items()))
    v = m.init(jax.random.key(0), x)
    return ag.generate_search_space(m.apply, v, x)


TRUNK = {"embed/kernel", "embed/bias", "head/kernel", "head/bias", "ln_f/scale", "ln_f/bias"}


def test_linen_multi_head_attention_pre_norm():
    space = _linen_space(LinenPreNorm)
    expected = []
    for b in ("block0", "block1"):
        expected.append(_attention(b))
        expected.append({f"{b}/ln2/scale", f"{b}/ln2/bias", f"{b}/up/kernel", f"{b}/up/bias",
                         f"{b}/down/kernel", f"{b}/down/bias"})
    assert _contents(space) == expected
    assert {p.removeprefix("params/") for p in space.complement_paths} == TRUNK


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["grouped-query", "multi-query"])
def test_einsum_attention_rope_rmsnorm_swiglu(kv_heads):
    space = _linen_space(EinsumLlama, kv_heads=kv_heads)
    expected = []
    for b in ("block0", "block1"):
        expected.append({f"{b}/attn_norm/scale"} | {f"{b}/{p}/kernel" for p in "qkvo"})
        expected.append({f"{b}/mlp_norm/scale"}
                        | {f"{b}/{p}/kernel" for p in ("gate", "up", "down")})
    assert _contents(space) == expected
    assert {p.removeprefix("params/") for p in space.complement_paths} == TRUNK


def test_fused_qkv():
    space = _linen_space(FusedQKV)
    expected = []
    for b in ("block0", "block1"):
        expected.append({f"{b}/{m}/{leaf}" for m in ("ln1", "qkv", "proj")
                         for leaf in (("scale", "bias") if m == "ln1" else ("kernel", "bias"))})
        expected.append({f"{b}/{m}/{leaf}" for m in ("ln2", "fc1", "fc2")
                         for leaf in (("scale", "bias") if m == "ln2" else ("kernel", "bias"))})
    assert _contents(space) == expected


def test_post_norm_groups_hold_every_projection():
    space = _linen_space(PostNorm)
    expected = []
    for b in ("block0", "block1"):
        expected.append(_attention(b, norm=None))
        expected.append({f"{b}/up/kernel", f"{b}/up/bias", f"{b}/down/kernel", f"{b}/down/bias"})
    assert _contents(space) == expected
    # the norms are on the residual stream: not removable
    comp = {p.removeprefix("params/") for p in space.complement_paths}
    assert comp == TRUNK | {f"block{i}/ln{j}/{leaf}" for i in (0, 1) for j in (1, 2)
                            for leaf in ("scale", "bias")}


def test_parallel_block_shares_its_norm():
    space = _linen_space(Parallel)
    contents = _contents(space)
    for b in ("block0", "block1"):
        assert _attention(b, norm=None) in contents
        assert {f"{b}/up/kernel", f"{b}/up/bias", f"{b}/down/kernel", f"{b}/down/bias"} in contents
    assert len(contents) == 4


class NNXBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=D, decode=False,
                                           rngs=rngs)
        self.ln2 = nnx.LayerNorm(D, rngs=rngs)
        self.up = nnx.Linear(D, 2 * D, rngs=rngs)
        self.down = nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Linear(D, D, rngs=rngs)
        self.block = NNXBlock(rngs)
        self.head = nnx.Linear(D, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(self.block(self.embed(x)).mean(axis=1))


def test_nnx_multi_head_attention():
    x = jax.random.normal(jax.random.key(1), (2, T, D))
    space = ag.generate_search_space(NNXNet(nnx.Rngs(0)), None, x)
    assert _contents(space) == [
        _attention("block"),
        {"block/ln2/scale", "block/ln2/bias", "block/up/kernel", "block/up/bias",
         "block/down/kernel", "block/down/bias"},
    ]


def test_softmax_and_gelu_internals_are_not_joints():
    space = _linen_space(LinenPreNorm)
    t = space.trace
    subs = [op.index for op in t.program.ops if op.name in ("sub", "add") and
            len(op.data_invars(t.program.data)) == 2]
    # softmax's x - max(x), the norms' x - mean(x) and GELU's x + c x^3 combine one value
    # with itself; only the residual sums join two branches
    joined = [i for i in subs if i not in t.self_joint_ops]
    assert len(joined) == 4, [t.program.ops[i].name_stack for i in joined]


@pytest.mark.parametrize("block", [EinsumLlama, PostNorm, Parallel],
                         ids=["einsum-llama", "post-norm", "parallel"])
def test_removing_whole_blocks_is_exact(block):
    x = jax.random.normal(jax.random.key(1), (2, T, D))
    m = Net(block)
    v = m.init(jax.random.key(0), x)
    space = ag.generate_search_space(m.apply, v, x)
    x3 = jax.random.normal(jax.random.key(2), (3, T, D))
    for zero in ([0], [1, 2]):
        z = space.zero_groups(v, zero)
        sub = ag.construct_subnetwork(space, z)
        assert ag.relative_difference(m.apply(z, x3), sub.apply(sub.variables, x3)) < 1e-5


def test_abstract_variables_give_the_same_groups():
    x = jax.random.normal(jax.random.key(1), (2, T, D))
    m = Net(EinsumLlama)
    concrete = m.init(jax.random.key(0), x)
    abstract = jax.eval_shape(m.init, jax.random.key(0), x)
    spaces = [ag.generate_search_space(m.apply, v, x) for v in (concrete, abstract)]
    assert _contents(spaces[0]) == _contents(spaces[1]) and len(spaces[0].groups) == 4
    assert not spaces[1].excluded


class MaskedAttention(nn.Module):
    """BERT-style: post-norm, an additive attention bias computed from a second input."""

    @nn.compact
    def __call__(self, x, mask):
        hd = D // HEADS
        bias = jnp.where(mask[:, None, None, :] > 0, 0.0, -1e9)
        q = nn.DenseGeneral((HEADS, hd), name="q")(x)
        k = nn.DenseGeneral((HEADS, hd), name="k")(x)
        v = nn.DenseGeneral((HEADS, hd), name="v")(x)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(hd) + bias
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)
        x = nn.LayerNorm(name="ln1")(x + nn.DenseGeneral(D, axis=(-2, -1), name="o")(o))
        return nn.LayerNorm(name="ln2")(x + nn.Dense(D, name="down")(
            nn.gelu(nn.Dense(2 * D, name="up")(x))))


def test_an_additive_mask_from_another_input_does_not_split_attention():
    x = jax.random.normal(jax.random.key(0), (2, T, D))
    mask = jnp.ones((2, T), jnp.int32).at[0, -2:].set(0)
    model = MaskedAttention()
    v = model.init(jax.random.key(1), x, mask)
    space = ag.generate_search_space(model.apply, v, x, mask)
    assert [{p.split("/")[0] for p in g} for g in _contents(space)] == [
        {"q", "k", "v", "o"}, {"up", "down"}]
    # the whole attention branch goes; the mask input then feeds nothing: not valid alone
    assert space.is_valid([1]) and not space.is_valid([0])
    z = space.zero_groups(v, [1])
    sub = ag.construct_subnetwork(space, z)
    x3 = jax.random.normal(jax.random.key(2), (3, T, D))
    m3 = jnp.ones((3, T), jnp.int32).at[1, -3:].set(0)
    assert ag.relative_difference(model.apply(z, x3, m3), sub.apply(sub.variables, x3, m3)) \
        <= 1e-5


def test_a_residual_on_the_raw_input_stays_a_removal_structure():
    def net(p, x):  # x + f(x) straight on the input: x is read by f, not a side input
        x = x + jnp.tanh(x @ p["a"]) @ p["b"]
        return x @ p["out"]

    p = {"a": jnp.ones((D, D)) / D, "b": jnp.ones((D, D)) / D, "out": jnp.ones((D, 2))}
    space = ag.generate_search_space(net, p, jnp.ones((2, D)))
    assert [g.param_paths for g in space.groups] == [("a", "b")]
