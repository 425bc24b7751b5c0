"""The asgssd command end to end, on a small synthetic dataset."""

from __future__ import annotations

import json

import pytest

from asgssd_jax import cli
from asgssd_jax.pipeline import RunConfig, run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = RunConfig(model="demonet", dataset="synthetic", train_size=96, test_size=64,
                    epochs=2, warmup_epochs=1, projection_epochs=1, batch_size=32,
                    target_sparsity=0.5, finetune_epochs=1, out=str(out))
    run(cfg, log=lambda s: None, progress=False)
    return out


def test_run_leaves_report_pictures_plots_checkpoint_and_export(run_dir):
    for name in ("report.json", "report.md", "trace_graph.dot", "segment_graph.dot",
                 "redundant_structures.dot", "subnetwork.dot", "loss_accuracy.png",
                 "group_sparsity.png", "subnetwork.jax_export"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "subnetwork_checkpoint").is_dir()
    report = json.loads((run_dir / "report.json").read_text())
    assert report["search_space"]["num_groups"] == 5 and report["search_space"]["K"] == 2
    assert len(report["zero_groups"]) == 2
    assert report["subnetwork"]["params"] < report["full"]["params"]
    assert report["subnetwork"]["macs"] < report["full"]["macs"]
    assert report["subnetwork"]["relative_difference_to_zeroed_full"] <= 1e-5
    assert report["finetune"] is not None
    assert "g" in (run_dir / "report.md").read_text()


def test_cli_report_redraws_from_the_json(run_dir, capsys):
    (run_dir / "report.md").unlink()
    assert cli.main(["report", str(run_dir)]) == 0
    assert "demonet on synthetic" in capsys.readouterr().out
    assert (run_dir / "report.md").exists()


def test_cli_user_errors_have_no_traceback(capsys):
    assert cli.main(["run", "--target-sparsity", "1.0"]) == 2
    assert "must be in [0, 1)" in capsys.readouterr().err
    assert cli.main(["run", "--model", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert cli.main(["run", "--dataset", "cifar10", "--data-dir", "/nonexistent"]) == 2
    assert "data" in capsys.readouterr().err
    assert cli.main(["report", "/nonexistent"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_models_lists_the_zoo(capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert "demonet" in out and "darts_8cells" in out


def test_learning_rate_schedules():
    from asgssd_jax.pipeline import _schedule

    def at(cfg, *steps):
        s = _schedule(cfg, 120, 10)
        return [round(float(s(i)), 6) for i in steps]

    # a one-epoch linear ramp, then cosine annealing to zero
    assert at(RunConfig(epochs=12), 0, 9, 10, 119) == [0.01, 0.091, 0.1,
                                                       pytest.approx(2e-5, abs=1e-5)]
    assert at(RunConfig(epochs=12, lr_warmup_epochs=0), 0) == [0.1]
    # Table 8: the search phase at its own constant rate, then 0.1 falling x0.1 every 3 epochs
    cfg = RunConfig(epochs=12, warmup_epochs=3, search_learning_rate=0.001, schedule="step",
                    step_epochs=3, lr_warmup_epochs=0)
    assert at(cfg, 0, 29, 30, 59, 60, 90) == [0.001, 0.001, 0.1, 0.1, 0.01, 0.001]
    with pytest.raises(ValueError, match="--search-lr"):
        RunConfig(search_learning_rate=0.0).validate()
    with pytest.raises(ValueError, match="--schedule"):
        RunConfig(schedule="linear").validate()


def test_a_failing_export_leaves_the_runs_results(tmp_path, monkeypatch):
    """jax.export is the run's last, optional artifact: when it fails, the report stands."""
    from asgssd_jax import export as export_lib

    def fail(*args, **kwargs):
        raise NotImplementedError("no lowering for this primitive")

    monkeypatch.setattr(export_lib, "export_subnetwork", fail)
    logged = []
    report = run(RunConfig(model="demonet", dataset="synthetic", train_size=64, test_size=32,
                           epochs=2, warmup_epochs=1, projection_epochs=1, batch_size=32,
                           target_sparsity=0.5, out=str(tmp_path)),
                 log=logged.append, progress=False)
    assert report["export_error"] == "NotImplementedError: no lowering for this primitive"
    assert report["subnetwork"]["export"] is None and report["subnetwork"]["params"] > 0
    assert any("jax.export of the sub-network failed" in line for line in logged)
    assert (tmp_path / "subnetwork_checkpoint").exists()
    assert not (tmp_path / "subnetwork.jax_export").exists()
    assert "export: failed (NotImplementedError" in (tmp_path / "report.md").read_text()
