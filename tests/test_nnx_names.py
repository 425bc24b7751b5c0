"""NNX models are named by their attribute paths in summaries and pictures, as linen models are
by their module names; tracing leaves the NNX classes as they were."""

import jax
import jax.numpy as jnp
from flax import nnx

import asgssd_jax as ag
from asgssd_jax import viz


class Block(nnx.Module):
    def __init__(self, d: int, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(2, d, decode=False, rngs=rngs)
        self.mlp = nnx.Sequential(nnx.Linear(d, 2 * d, rngs=rngs), nnx.gelu,
                                  nnx.Linear(2 * d, d, rngs=rngs))

    def __call__(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, d: int = 8):
        self.embed = nnx.Linear(3, d, rngs=rngs)
        self.blocks = nnx.List([Block(d, rngs) for _ in range(2)])
        self.head = nnx.Linear(d, 2, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


def test_nnx_attribute_paths_name_the_operators():
    classes = (nnx.Linear, nnx.Sequential, nnx.LayerNorm, nnx.MultiHeadAttention, Block, Net)
    before = {cls: vars(cls).get("__call__") for cls in classes}
    model = Net(nnx.Rngs(0))
    space = ag.generate_search_space(model, None, jnp.ones((2, 5, 3)))
    assert {cls: vars(cls).get("__call__") for cls in classes} == before
    text = space.summary()
    for name in ("blocks/0/attn", "blocks/0/mlp/layers/0", "blocks/1/attn", "blocks/1/norm"):
        assert name in text, text
    modules = {space.trace.vertices[v].module for v in space.trace.vertices}
    assert {"embed", "head", "blocks/1/mlp/layers/2"} <= modules
    assert "blocks/0/attn" in viz.draw_segment_graph(space).source
    # The names change nothing else: the sub-network is still exact.
    model.blocks[0].mlp.layers[0].kernel[...] = 0.0
    model.blocks[0].mlp.layers[0].bias[...] = 0.0
    model.blocks[0].mlp.layers[2].kernel[...] = 0.0
    model.blocks[0].mlp.layers[2].bias[...] = 0.0
    sub = ag.construct_subnetwork(space, model)
    x = jax.random.normal(jax.random.key(1), (3, 5, 3))
    assert ag.relative_difference(model(x), sub(x)) <= 1e-5
