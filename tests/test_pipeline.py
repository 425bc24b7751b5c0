"""The asgssd command end to end, on a small synthetic dataset."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys

import pytest

from asgssd_jax import cli
from asgssd_jax import report as report_lib
from asgssd_jax.pipeline import RunConfig, run


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """A run on a machine without Graphviz, its output going to a file (not a terminal)."""
    out = tmp_path_factory.mktemp("run")
    cfg = RunConfig(model="demonet", dataset="synthetic", train_size=96, test_size=64,
                    epochs=2, warmup_epochs=1, projection_epochs=1, batch_size=32,
                    target_sparsity=0.5, finetune_epochs=1, out=str(out))
    logged: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", "")
        mp.setattr(shutil, "which", lambda *a, **k: None)
        mp.setattr(sys, "stderr", io.StringIO())
        run(cfg, log=logged.append, progress=True, progress_seconds=0.0)
    return out, logged


@pytest.fixture(scope="module")
def run_dir(logged_run):
    return logged_run[0]


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
    # paths in report.json are relative to the run directory
    assert report["subnetwork"]["checkpoint"] == "subnetwork_checkpoint"
    assert report["subnetwork"]["export"] == "subnetwork.jax_export"
    assert report["task"]["name"] == "classification" and "eval_perplexity" not in report["full"]
    md = (run_dir / "report.md").read_text()
    assert "| | params | MACs | test accuracy |" in md
    zero = ", ".join(f"g{i}" for i in report["zero_groups"])
    assert f"zero groups after H2SPG: {zero}." in md
    assert f"| sub-network | {report['subnetwork']['params'] / 1e6:.3f}M |" in md


def _links(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def test_pictures_without_graphviz_and_every_report_link_resolves(run_dir):
    links = _links((run_dir / "report.md").read_text())
    assert sorted(links) == sorted(f for f, _ in report_lib.PICTURES)
    for link in links:
        assert (run_dir / link).stat().st_size > 0, link
    assert "<svg" in (run_dir / "subnetwork.svg").read_text()


def test_the_report_links_no_missing_picture(run_dir, tmp_path):
    report = json.loads((run_dir / "report.json").read_text())
    for f in ("report.json", "trace_graph.dot"):
        shutil.copy(run_dir / f, tmp_path / f)
    md = report_lib.write_markdown(report, tmp_path).read_text()
    assert _links(md) == []
    assert "Not drawn: trace_graph.svg, loss_accuracy.png, group_sparsity.png" in md


def test_progress_lines_within_an_epoch_when_output_is_not_a_terminal(logged_run):
    _, logged = logged_run
    first_epoch = next(i for i, line in enumerate(logged) if line.startswith("epoch 1/2"))
    steps = [line for line in logged[:first_epoch] if line.startswith("H2SPG step ")]
    assert [line.split(":")[0] for line in steps] == ["H2SPG step 1/6", "H2SPG step 2/6",
                                                      "H2SPG step 3/6"]
    assert "loss" in steps[0] and "zero groups 0/2" in steps[0]


def test_cli_report_redraws_every_picture(run_dir, capsys, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    for f, _ in report_lib.PICTURES:
        (run_dir / f).unlink()
    (run_dir / "report.md").unlink()
    assert cli.main(["report", str(run_dir)]) == 0
    assert "demonet on synthetic" in capsys.readouterr().out
    assert (run_dir / "report.md").exists()
    for f, _ in report_lib.PICTURES:
        assert (run_dir / f).exists(), f


def test_a_second_run_into_the_same_directory_is_refused(run_dir, capsys):
    before = (run_dir / "report.json").read_text()
    assert cli.main(["run", "--dataset", "synthetic", "--train-size", "64", "--out",
                     str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (run_dir / "report.json").read_text() == before


def test_overwrite_removes_only_the_previous_runs_files(tmp_path):
    from asgssd_jax.pipeline import _prepare_run_dir

    (tmp_path / "checkpoints" / "h2spg").mkdir(parents=True)
    (tmp_path / "config.json").write_text(json.dumps({"model": "demonet"}))
    for f in ("report.json", "trace_graph.dot", "trace_graph.svg", "notes.txt"):
        (tmp_path / f).write_text("x")
    with pytest.raises(ValueError, match="--resume: the run in .* has model 'demonet'"):
        _prepare_run_dir(RunConfig(model="resnet18", resume=True), tmp_path)
    _prepare_run_dir(RunConfig(overwrite=True), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_flags_that_do_not_apply_are_errors(capsys):
    for argv, words in [
        (["--data-dir", "/nonexistent"], "--data-dir is for tensorflow-datasets data"),
        (["--periods", "3"], "--periods applies to --schedule multi_cosine only"),
        (["--step-epochs", "5"], "--step-epochs applies to --schedule step only"),
        (["--base", "adam", "--momentum", "0.5"], "--momentum applies to --base sgd only"),
        (["--resume", "--overwrite"], "pass one of them"),
    ]:
        assert cli.main(["run", *argv]) == 2, argv
        assert words in capsys.readouterr().err


def test_run_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    assert text.count("(default: runs/MODEL-DATASET)") == 1
    assert "(default: 0.5; language modelling: 0.25)" in text and "(default: demonet)" in text
    assert "(default: 6)" in text  # the epochs: the same for every task


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


def test_fade_out_flag_reaches_the_optimizer(tmp_path, monkeypatch):
    """``--fade-out`` selects OTO's HESSO-style fade-out; the default is the half-space test."""
    from asgssd_jax import pipeline

    seen = []

    class Stop(Exception):
        pass

    def recording_h2spg(*args, **kwargs):
        seen.append(kwargs["fade_out"])
        raise Stop

    monkeypatch.setitem(pipeline._OPTIMIZERS, "h2spg", recording_h2spg)
    for flags, expected in (([], False), (["--fade-out"], True)):
        with pytest.raises(Stop):
            cli.main(["run", "--dataset", "synthetic", "--train-size", "32", "--test-size", "8",
                      "--out", str(tmp_path / str(expected)), "--quiet", *flags])
        assert seen[-1] is expected
