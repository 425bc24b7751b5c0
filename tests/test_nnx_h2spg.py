"""The NNX flow end to end: nnx.Optimizer with H2SPG reaches exactly K zero groups,
h2spg_info reads its state, and the trained module gives an exact nnx.Module sub-network."""

import jax
import numpy as np
import optax
from flax import nnx

import asgssd_jax as ag


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.stem = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.a = nnx.Conv(8, 8, (3, 3), rngs=rngs)
        self.b = nnx.Conv(8, 8, (3, 3), rngs=rngs)
        self.c = nnx.Conv(8, 8, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.head = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.stem(x))
        h = self.drop(nnx.relu(self.bn(self.a(h) + self.b(h) + self.c(h) + h)))
        return self.head(h.mean((1, 2)))


def test_nnx_optimizer_with_h2spg_to_an_nnx_sub_network():
    model = Net(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (16, 8, 8, 1))
    y = jax.random.randint(jax.random.key(2), (16,), 0, 10)
    space = ag.generate_search_space(model, None, x)
    assert space.num_groups == 3
    opt = nnx.Optimizer(model, ag.h2spg(space, 0.05, 0.67, warmup_steps=5, projection_steps=5),
                        wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()  # noqa: E731
        opt.update(model, nnx.grad(loss)(model))

    model.train()
    for _ in range(12):
        step(model, opt, x, y)
    info = ag.h2spg_info(opt.opt_state)
    zero = np.asarray(info.zero_groups)
    assert isinstance(info.zero_groups, jax.Array) and zero.sum() == 2  # K = int(0.67 * 3)
    assert sorted(np.flatnonzero(zero)) == space.zero_group_indices(
        {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
         "state": nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))})

    sub = ag.construct_subnetwork(space, model)
    assert isinstance(sub, nnx.Module)
    assert ag.count_params(nnx.state(sub, nnx.Param)) < ag.count_params(nnx.state(model, nnx.Param))
    model.eval()
    sub.eval()
    for b in (1, 5):
        xb = jax.random.normal(jax.random.key(b), (b, 8, 8, 1))
        assert ag.relative_difference(model(xb), sub(xb)) <= 1e-5
