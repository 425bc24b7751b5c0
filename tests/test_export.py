"""Saving and exporting sub-networks: orbax round trips and jax.export artifacts."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import asgssd_jax as ag
import asgssd_zoo as models
from tests.test_surgery import fast_init


@pytest.fixture(scope="module")
def demonet_sub():
    model = models.create("demonet")
    variables = fast_init(model, (28, 28, 1))
    space = ag.generate_search_space(model.apply, variables, jnp.ones((2, 28, 28, 1)),
                                     train=False)
    vz = space.zero_groups(variables, [0, 1, 4])  # Figure 4
    return ag.construct_subnetwork(space, vz)


X = jax.random.normal(jax.random.key(0), (5, 28, 28, 1))


def _equal_trees(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_orbax_round_trip(demonet_sub, tmp_path):
    sub = demonet_sub
    path = ag.save_subnetwork(tmp_path / "sub", sub)
    restored = ag.load_subnetwork(path, models.create("demonet").apply)
    _equal_trees(restored.variables, sub.variables)
    apply = jax.jit(lambda s, v, x: s.apply(v, x), static_argnums=0)
    np.testing.assert_array_equal(apply(restored, restored.variables, X),
                                  apply(sub, sub.variables, X))
    # train mode, with its BatchNorm updates, survives the round trip too
    y1, s1 = sub.apply(sub.variables, X, train=True, mutable=["batch_stats"])
    y2, s2 = restored.apply(restored.variables, X, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y1, y2, rtol=1e-6)
    _equal_trees(jax.tree_util.tree_map(np.asarray, s1), jax.tree_util.tree_map(np.asarray, s2))


def test_orbax_saves_fine_tuned_variables(demonet_sub, tmp_path):
    sub = demonet_sub
    tuned = jax.tree_util.tree_map(lambda a: a * 1.5, sub.variables)
    path = ag.save_subnetwork(tmp_path / "tuned", sub, tuned)
    restored = ag.load_subnetwork(path, models.create("demonet").apply)
    _equal_trees(restored.variables, tuned)
    with pytest.raises(ValueError, match="exists"):
        ag.save_subnetwork(tmp_path / "tuned", sub, tuned)  # no silent overwrite
    ag.save_subnetwork(tmp_path / "tuned", sub, force=True)  # overwrites with sub.variables
    _equal_trees(ag.load_subnetwork(path, models.create("demonet").apply).variables,
                 sub.variables)


def test_restore_needs_the_same_model_definition(demonet_sub, tmp_path):
    path = ag.save_subnetwork(tmp_path / "sub", demonet_sub)
    with pytest.raises(ag.SurgeryError, match="differs|variables"):
        ag.load_subnetwork(path, models.create("demonet", width=2).apply)


def _run(code: str, cwd) -> str:
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_restore_in_a_fresh_process(demonet_sub, tmp_path):
    sub = demonet_sub
    path = ag.save_subnetwork(tmp_path / "sub", sub)
    np.save(tmp_path / "x.npy", np.asarray(X))
    expected = np.asarray(sub.apply(sub.variables, X))
    _run(f"""
        import numpy as np, asgssd_zoo as models, asgssd_jax as ag
        sub = ag.load_subnetwork({str(path)!r}, models.create("demonet").apply)
        np.save("y.npy", np.asarray(sub.apply(sub.variables, np.load("x.npy"))))
        """, tmp_path)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-6, atol=1e-7)


def test_jax_export_symbolic_batch(demonet_sub, tmp_path):
    sub = demonet_sub
    exported = ag.export_subnetwork(sub, X[:2], path=tmp_path / "sub.jaxexp")
    assert "batch" in str(exported.exported.in_avals[-1].shape)
    loaded = ag.load_exported(tmp_path / "sub.jaxexp")
    apply = jax.jit(sub.apply)
    for b in (1, 5, 8):
        x = jax.random.normal(jax.random.key(b), (b, 28, 28, 1))
        np.testing.assert_allclose(loaded(x), apply(sub.variables, x), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(loaded(X), exported(X))
    # A one-line summary, not the StableHLO and the weights.
    text = repr(loaded)
    assert len(text) < 200 and "in=[f32[batch,28,28,1]]" in text and "out=[f32[batch,10]]" in text


def test_exported_artifact_runs_without_model_code(demonet_sub, tmp_path):
    sub = demonet_sub
    ag.export_subnetwork(sub, X, path=tmp_path / "sub.jaxexp")
    np.save(tmp_path / "x.npy", np.asarray(X))
    # only jax and flax's msgpack reader: no asgssd_jax, no models
    out = _run("""
        import sys, numpy as np, jax
        from flax import serialization
        data = serialization.msgpack_restore(open("sub.jaxexp", "rb").read())
        exp = jax.export.deserialize(bytearray(data["exported"]))
        y = exp.call(data["variables"], np.load("x.npy"))
        np.save("y.npy", np.asarray(y))
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("asgssd_zoo", "asgssd_jax")))
        """, tmp_path)
    assert out.strip() == "[]"
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), jax.jit(sub.apply)(sub.variables, X),
                               rtol=1e-6, atol=1e-6)


def test_jax_export_when_the_program_changes_with_a_symbolic_batch(tmp_path):
    # ViT's x[:, 0] is a gather under a symbolic batch size: exported per example instead
    model = models.create("vit_s16", patch_size=4, hidden_dim=16, depth=2, num_heads=2,
                          mlp_dim=32, num_classes=10)
    variables = fast_init(model, (8, 8, 3))
    space = ag.generate_search_space(model.apply, variables, jnp.ones((1, 8, 8, 3)),
                                     train=False)
    vz = space.zero_groups(variables, [0])
    sub = ag.construct_subnetwork(space, vz)
    ag.export_subnetwork(sub, jnp.ones((1, 8, 8, 3)), path=tmp_path / "vit.jaxexp")
    loaded = ag.load_exported(tmp_path / "vit.jaxexp")
    for b in (1, 4):
        x = jax.random.normal(jax.random.key(b), (b, 8, 8, 3))
        np.testing.assert_allclose(loaded(x), model.apply(vz, x), rtol=1e-5, atol=1e-6)
