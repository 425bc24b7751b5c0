"""A small BatchNorm classifier and deterministic batches for the training tests."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class Small(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = jax.nn.relu(x).mean((1, 2))
        return nn.Dense(3)(x)


def make_model():
    model = Small()
    return model, model.init(jax.random.key(0), jnp.ones((1, 6, 6, 2)))


def batches_fn(epoch: int, batch: int = 16, steps: int = 4):
    rng = np.random.default_rng(epoch)
    for _ in range(steps):
        y = rng.integers(0, 3, batch)
        x = rng.normal(size=(batch, 6, 6, 2)).astype(np.float32) + y[:, None, None, None]
        yield x, y.astype(np.int32)
