"""Vision Transformer ViT-S/16 for ImageNet (timm layout, 22,050,664 params).

16x16 patch embedding (a strided conv with bias), a class token, learned position embeddings,
12 pre-norm blocks ``x = x + attention(norm(x))``, ``x = x + mlp(norm(x))``, a final LayerNorm
and a linear head on the class token.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class Attention(nn.Module):
    num_heads: int

    @nn.compact
    def __call__(self, x):
        b, n, d = x.shape
        h = self.num_heads

        def heads(name):
            return nn.Dense(d, name=name)(x).reshape(b, n, h, d // h)

        q, k, v = heads("query"), heads("key"), heads("value")
        weights = jax.nn.softmax(jnp.einsum("bqhc,bkhc->bhqk", q, k) / jnp.sqrt(d // h), axis=-1)
        y = jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(b, n, d)
        return nn.Dense(d, name="out")(y)


class MLP(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x):
        y = jax.nn.gelu(nn.Dense(self.hidden, name="fc1")(x))
        return nn.Dense(x.shape[-1], name="fc2")(y)


class EncoderBlock(nn.Module):
    num_heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x + Attention(self.num_heads, name="attention")(nn.LayerNorm(name="norm1")(x))
        return x + MLP(self.mlp_dim, name="mlp")(nn.LayerNorm(name="norm2")(x))


class ViT(nn.Module):
    num_classes: int = 1000
    patch_size: int = 16
    hidden_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_dim: int = 1536

    @nn.compact
    def __call__(self, x, train: bool = False):
        p = self.patch_size
        x = nn.Conv(self.hidden_dim, (p, p), strides=p, padding="VALID", name="patch_embed")(x)
        b, gh, gw, d = x.shape
        x = x.reshape(b, gh * gw, d)
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, d))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
        x = x + self.param("pos_embed", nn.initializers.normal(0.02), (1, gh * gw + 1, d))
        for i in range(self.depth):
            x = EncoderBlock(self.num_heads, self.mlp_dim, name=f"block{i}")(x, train)
        x = nn.LayerNorm(name="norm")(x)
        return nn.Dense(self.num_classes, name="head")(x[:, 0])


from asgssd_zoo import register  # noqa: E402

register("vit_s16", ViT, input_shape=(224, 224, 3), num_classes=1000, dataset="imagenet")
