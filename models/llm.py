"""A small decoder-only language model in the current style (Llama layout).

Token embedding, ``depth`` pre-norm blocks ``x = x + attention(norm(x))``,
``x = x + mlp(norm(x))`` with RMSNorm, rotary position embeddings (RoPE), grouped-query
attention (``num_kv_heads`` key/value heads shared by ``num_heads`` query heads) and a SwiGLU
MLP, a final RMSNorm and an untied output projection. Every attention branch and every MLP
branch ends in a residual add, so each is a removal structure: removing K of the 2L branches is
the layer/block dropping that structural search on LLMs is used for today.

``scan_layers=True`` stacks the blocks' parameters on a leading axis and runs them with
``nn.scan`` (the way large JAX models keep compile time flat in depth); the computation is the
same as the unrolled stack.

Input: integer token ids ``[batch, length]``; output: logits ``[batch, length, vocab]``.
``num_classes`` is the vocabulary size (the zoo's constructor field for the output width).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def rope(x: jax.Array, base: float = 10_000.0) -> jax.Array:
    """Rotary position embedding of ``x`` [batch, length, heads, head_dim] (half-split form)."""
    length, dim = x.shape[1], x.shape[-1]
    freqs = base ** (-jnp.arange(0, dim // 2, dtype=jnp.float32) / (dim // 2))
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * freqs[None, :]
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nn.Module):
    """Causal grouped-query attention with separate q, k, v and output projections."""

    num_heads: int
    num_kv_heads: int

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        h, kv = self.num_heads, self.num_kv_heads
        c = d // h
        q = nn.Dense(h * c, use_bias=False, name="q_proj")(x).reshape(b, t, h, c)
        k = nn.Dense(kv * c, use_bias=False, name="k_proj")(x).reshape(b, t, kv, c)
        v = nn.Dense(kv * c, use_bias=False, name="v_proj")(x).reshape(b, t, kv, c)
        q, k = rope(q), rope(k)
        q = q.reshape(b, t, kv, h // kv, c)
        logits = jnp.einsum("bqkgc,bskc->bkgqs", q, k) / jnp.sqrt(c)
        causal = jnp.tril(jnp.ones((t, t), bool))
        logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1)
        y = jnp.einsum("bkgqs,bskc->bqkgc", weights, v).reshape(b, t, h * c)
        return nn.Dense(d, use_bias=False, name="o_proj")(y)


class SwiGLU(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x):
        gate = nn.Dense(self.hidden, use_bias=False, name="gate_proj")(x)
        up = nn.Dense(self.hidden, use_bias=False, name="up_proj")(x)
        return nn.Dense(x.shape[-1], use_bias=False, name="down_proj")(jax.nn.silu(gate) * up)


class Block(nn.Module):
    num_heads: int
    num_kv_heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        x = x + Attention(self.num_heads, self.num_kv_heads, name="attn")(
            nn.RMSNorm(name="attn_norm")(x))
        return x + SwiGLU(self.mlp_dim, name="mlp")(nn.RMSNorm(name="mlp_norm")(x))


class _ScanBlock(nn.Module):
    """``Block`` with ``nn.scan``'s (carry, xs) -> (carry, ys) signature."""

    num_heads: int
    num_kv_heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x, _):
        return Block(self.num_heads, self.num_kv_heads, self.mlp_dim, name="block")(x), None


class DecoderLM(nn.Module):
    num_classes: int = 128  # vocabulary size
    dim: int = 128
    depth: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    mlp_dim: int = 352
    scan_layers: bool = False

    @nn.compact
    def __call__(self, tokens, train: bool = False):
        x = nn.Embed(self.num_classes, self.dim, name="embed")(tokens)
        if self.scan_layers:
            stack = nn.scan(_ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                            length=self.depth)
            x, _ = stack(self.num_heads, self.num_kv_heads, self.mlp_dim, name="layers")(x, None)
        else:
            for i in range(self.depth):
                x = Block(self.num_heads, self.num_kv_heads, self.mlp_dim, name=f"layers_{i}")(x)
        x = nn.RMSNorm(name="norm")(x)
        return nn.Dense(self.num_classes, use_bias=False, name="lm_head")(x)


from asgssd_zoo import register  # noqa: E402

register("decoder_lm", DecoderLM, input_shape=(128,), num_classes=128, dataset="python_source",
         input_dtype="int32")
