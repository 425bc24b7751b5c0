"""``asgssd construct`` and ``asgssd export``, in-process on a tiny run."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import asgssd_zoo as models
from asgssd_jax import cli, generate_search_space, load_exported, load_subnetwork
from asgssd_jax.pipeline import RunConfig, run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run(RunConfig(model="demonet", dataset="synthetic", train_size=96, test_size=64,
                  batch_size=32, epochs=3, warmup_epochs=1, projection_epochs=1,
                  target_sparsity=0.4, out=str(out)), progress=False, log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """``asgssd construct --model demonet --zero-groups 1,4`` at seed 3."""
    out = tmp_path_factory.mktemp("construct") / "demonet"
    assert cli.main(["construct", "--model", "demonet", "--zero-groups", "1,4", "--seed", "3",
                     "--out", str(out)]) == 0
    return out


def _apply(apply_fn, variables, x):
    return jax.jit(lambda v, x: apply_fn(v, x, train=False))(variables, x)


def _outputs_close(a, b, tol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    assert np.max(np.abs(a - b)) <= tol * (np.max(np.abs(a)) + 1e-12)


def test_construct_from_a_run_rebuilds_the_runs_subnetwork(run_dir, tmp_path, capsys):
    report = json.loads((run_dir / "report.json").read_text())
    assert report["valid"] and report["zero_groups"]
    out = tmp_path / "c"
    assert cli.main(["construct", str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "full network" in printed and "sub-network" in printed
    assert f"{report['subnetwork']['params']:,}" in printed
    meta = json.loads((out / "construct.json").read_text())
    assert meta["zero_groups"] == report["zero_groups"]
    assert meta["subnetwork"]["params"] == report["subnetwork"]["params"]
    assert meta["subnetwork"]["macs"] == report["subnetwork"]["macs"]
    assert meta["full"]["params"] == report["full"]["params"]
    assert meta["relative_difference_to_zeroed_full"] <= 1e-5
    assert (out / "subnetwork.svg").exists() and (out / "subnetwork.dot").exists()
    # paths in construct.json are relative to its directory
    assert meta["checkpoint"] == "subnetwork_checkpoint"
    assert (out / meta["run_dir"]).resolve() == run_dir.resolve()
    # the same variables as the sub-network the run saved itself (no fine-tuning)
    apply_fn = models.create("demonet", num_classes=10).apply
    mine = load_subnetwork(out / "subnetwork_checkpoint", apply_fn)
    theirs = load_subnetwork(run_dir / "subnetwork_checkpoint", apply_fn)
    assert jax.tree_util.tree_structure(mine.variables) == \
        jax.tree_util.tree_structure(theirs.variables)
    for a, b in zip(jax.tree_util.tree_leaves(mine.variables),
                    jax.tree_util.tree_leaves(theirs.variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_construct_from_a_killed_run_uses_its_latest_checkpoint(run_dir, tmp_path, capsys):
    killed = tmp_path / "killed"
    shutil.copytree(run_dir / "checkpoints", killed / "checkpoints")  # no report.json
    assert cli.main(["construct", str(killed)]) == 2
    assert "pass --model" in capsys.readouterr().err
    assert cli.main(["construct", str(killed), "--model", "demonet"]) == 0
    capsys.readouterr()
    meta = json.loads((killed / "construct" / "construct.json").read_text())
    report = json.loads((run_dir / "report.json").read_text())
    assert meta["zero_groups"] == report["zero_groups"]
    assert meta["checkpoint_step"] == 9
    # the config.json a run writes when it starts is enough: no --model needed
    shutil.copy(run_dir / "config.json", killed / "config.json")
    assert cli.main(["construct", str(killed), "--out", str(killed / "c2")]) == 0
    capsys.readouterr()
    assert json.loads((killed / "c2" / "construct.json").read_text())["zero_groups"] == \
        report["zero_groups"]


def test_construct_refuses_a_checkpoint_with_no_zero_group(run_dir, tmp_path, capsys):
    """A run killed before the projection phase: nothing is zero yet (and config.json, not
    report.json, names the model)."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager((run_dir / "checkpoints" / "h2spg").absolute()) as manager:
        state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())
    state["params"] = jax.tree_util.tree_map(lambda a: a + 1.0, state["params"])
    with ocp.CheckpointManager((tmp_path / "checkpoints" / "h2spg").absolute(),
                               options=ocp.CheckpointManagerOptions(create=True)) as manager:
        manager.save(3, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
    (tmp_path / "config.json").write_text(json.dumps({"model": "demonet", "overrides": {}}))
    assert cli.main(["construct", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no group of demonet is exactly zero yet at step 3" in err and "--resume" in err
    assert "Traceback" not in err


def test_construct_model_zero_groups_is_exact(model_dir, capsys):
    meta = json.loads((model_dir / "construct.json").read_text())
    assert meta["zero_groups"] == [1, 4] and meta["num_groups"] == 5
    assert meta["subnetwork"]["params"] < meta["full"]["params"]
    model = models.create("demonet")
    x0 = jnp.zeros((1, *models.input_shape("demonet")))
    variables = jax.jit(model.init)(jax.random.key(3), x0)
    space = generate_search_space(model.apply, variables, x0, train=False)
    zeroed = space.zero_groups(variables, [1, 4])
    sub = load_subnetwork(model_dir / "subnetwork_checkpoint", model.apply)
    assert set(sub.removed_groups) == {1, 4}
    x = jax.random.normal(jax.random.key(7), (3, *models.input_shape("demonet")))
    _outputs_close(_apply(model.apply, zeroed, x), _apply(sub.apply, sub.variables, x))


@pytest.mark.parametrize("groups, message", [
    ("0,7", "valid range 0..4"),
    ("x", "comma-separated group indices"),
    ("3,4", "invalid set"),
])
def test_construct_user_errors_exit_2_without_traceback(groups, message, tmp_path, capsys):
    assert cli.main(["construct", "--model", "demonet", "--zero-groups", groups,
                     "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()


def test_construct_argument_errors(run_dir, capsys):
    assert cli.main(["construct"]) == 2
    assert "--zero-groups" in capsys.readouterr().err
    assert cli.main(["construct", "/nonexistent"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert cli.main(["construct", str(run_dir), "--zero-groups", "1"]) == 2
    assert "random initialisation" in capsys.readouterr().err
    assert cli.main(["construct", "--model", "nope", "--zero-groups", "1"]) == 2
    assert "error: unknown model 'nope'" in capsys.readouterr().err


def test_export_a_run_with_a_symbolic_batch(run_dir, tmp_path, capsys):
    path = tmp_path / "sub.jax_export"
    assert cli.main(["export", str(run_dir), "--out", str(path)]) == 0
    printed = capsys.readouterr().out
    assert str(path) in printed and "batch 2" in printed and "batch 5" in printed
    mlir = path.with_suffix(".mlir")
    assert path.stat().st_size > 0 and "stablehlo" in mlir.read_text()
    sub = load_subnetwork(run_dir / "subnetwork_checkpoint",
                          models.create("demonet", num_classes=10).apply)
    exported = load_exported(path)
    for n in (1, 6):
        x = jax.random.normal(jax.random.key(n), (n, *models.input_shape("demonet")))
        _outputs_close(_apply(sub.apply, sub.variables, x), exported(x))


def test_export_a_construct_dir_with_a_fixed_batch(model_dir, capsys):
    assert cli.main(["export", str(model_dir), "--batch", "3"]) == 0
    capsys.readouterr()
    path = model_dir / "subnetwork_batch3.jax_export"
    assert path.exists() and path.with_suffix(".mlir").exists()
    exported = load_exported(path)
    assert exported.exported.in_avals[-1].shape == (3, *models.input_shape("demonet"))
    sub = load_subnetwork(model_dir / "subnetwork_checkpoint", models.create("demonet").apply)
    x = jax.random.normal(jax.random.key(0), (3, *models.input_shape("demonet")))
    _outputs_close(_apply(sub.apply, sub.variables, x), exported(x))


def test_export_of_a_run_replaces_its_artifact_instead_of_copying_it(run_dir, capsys):
    assert cli.main(["export", str(run_dir)]) == 0
    assert f"wrote {run_dir / 'subnetwork.jax_export'}" in capsys.readouterr().out
    assert list(run_dir.rglob("*.jax_export")) == [run_dir / "subnetwork.jax_export"]
    assert (run_dir / "subnetwork.mlir").exists()


@pytest.mark.parametrize("command", ["space", "report", "models", "construct", "export"])
def test_every_command_has_a_description(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    usage, _, rest = capsys.readouterr().out.partition("\n\n")
    description = rest.split("\n\n")[0]
    assert len(description.split()) >= 10 and not description.lstrip().startswith(
        ("positional", "options")), description


def test_export_user_errors(tmp_path, capsys):
    assert cli.main(["export", "/nonexistent"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "asgssd construct" in err and "Traceback" not in err
