"""The reference training loop: learning, data-parallel and multi-process equivalence, resume."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from asgssd_jax import train
from tests.train_fixtures import batches_fn, make_model

ROOT = Path(__file__).resolve().parents[1]


def _fit(**kw):
    model, variables = make_model()
    return train.fit(model.apply, variables, optax.sgd(0.1, momentum=0.9), batches_fn,
                     epochs=2, steps_per_epoch=4, **kw)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_fit_learns_and_evaluates():
    model, variables = make_model()
    out, hist = train.fit(model.apply, variables, optax.sgd(0.1, momentum=0.9), batches_fn,
                          epochs=3, steps_per_epoch=4, eval_batches=lambda: batches_fn(99))
    assert hist.steps[-1]["loss"] < hist.steps[0]["loss"]
    assert hist.epochs[-1]["eval_accuracy"] > 0.5
    assert set(out) == {"params", "batch_stats"}


def test_fit_a_model_without_a_train_argument():
    """A model with neither dropout nor BatchNorm takes no ``train``: fit calls it without."""
    import flax.linen as nn
    import jax.numpy as jnp

    class Linear(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(x.mean((1, 2)))

    model = Linear()
    variables = model.init(jax.random.key(0), jnp.ones((1, 6, 6, 2)))
    assert train.mode_kwargs(model.apply, True) == {}
    assert train.mode_kwargs(make_model()[0].apply, True) == {"train": True}
    out, hist = train.fit(model.apply, variables, optax.sgd(0.1), batches_fn, epochs=2,
                          steps_per_epoch=4, eval_batches=lambda: batches_fn(99))
    assert hist.steps[-1]["loss"] < hist.steps[0]["loss"] and set(out) == {"params"}
    with pytest.raises(ValueError, match="linen-style variables"):
        train.fit(lambda p, x: x, variables["params"]["Dense_0"], optax.sgd(0.1), batches_fn,
                  epochs=1, steps_per_epoch=1)


def test_resume_after_a_kill_reaches_the_same_parameters(tmp_path):
    full, _ = _fit()

    class Killed(Exception):
        pass

    def kill(step, metrics, state):
        if step == 6:
            raise Killed

    with pytest.raises(Killed):
        _fit(checkpoint_dir=tmp_path, checkpoint_every=3, on_step=kill)
    resumed, hist = _fit(checkpoint_dir=tmp_path, checkpoint_every=3, resume=True)
    assert hist.start_step in (4, 6)  # from the last checkpoint that finished writing
    for a, b in zip(_leaves(full), _leaves(resumed)):
        np.testing.assert_array_equal(a, b)


def _run_worker(tmp_path, name, *args):
    out = tmp_path / f"{name}.npz"
    proc = subprocess.run([sys.executable, "-m", "tests.train_worker", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _load(path):
    data = np.load(path)
    return [data[k] for k in sorted(data.files, key=lambda s: int(s.split("_")[1]))]


def _assert_close(a, b):
    xs, ys = _load(a), _load(b)
    assert len(xs) == len(ys) > 0
    for x, y in zip(xs, ys):
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6)


def test_data_parallel_over_four_devices_matches_one(tmp_path):
    one = _run_worker(tmp_path, "one", "--devices", "1")
    four = _run_worker(tmp_path, "four", "--devices", "4")
    _assert_close(one, four)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    one = _run_worker(tmp_path, "single", "--devices", "1")
    port = str(_free_port())
    outs = [tmp_path / f"p{i}.npz" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "tests.train_worker", str(outs[i]),
                               "--devices", "1", "--num-processes", "2", "--process-id", str(i),
                               "--port", port], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    _assert_close(one, outs[0])
