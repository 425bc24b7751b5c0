"""``asgssd run`` on a language model: decoder_lm on the standard library's source, end to end
(a tiny model, short windows, a few steps)."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

import asgssd_zoo as zoo
from asgssd_jax import cli, tasks
from asgssd_jax.pipeline import RunConfig, run

TINY = {"depth": 2, "dim": 32, "mlp_dim": 64, "num_heads": 2, "num_kv_heads": 1}


def _config(out, **kw) -> RunConfig:
    return RunConfig(**{
        "model": "decoder_lm", "dataset": "python_source", "context_length": 32,
        "train_size": 64, "test_size": 24, "batch_size": 8, "steps_per_epoch": 4,
        "epochs": 3, "warmup_epochs": 1, "projection_epochs": 1, "target_sparsity": 0.5,
        "overrides": TINY, "out": str(out), **kw})


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm")
    logged: list[str] = []
    report = run(_config(out, finetune_epochs=1), log=logged.append, progress=False)
    return out, report, logged


def test_h2spg_zeroes_exactly_k_branches_and_the_subnetwork_is_exact(lm_run):
    out, report, _ = lm_run
    ss = report["search_space"]
    assert ss["num_groups"] == 4 and ss["K"] == 2  # 2 layers: attention and MLP branches
    assert len(report["zero_groups"]) == 2 and report["valid"]
    sub, full = report["subnetwork"], report["full"]
    assert sub["relative_difference_to_zeroed_full"] <= 1e-5
    assert sub["params"] < full["params"] and sub["macs"] < full["macs"]
    # the sub-network computes what the zeroed full network computes: the same evaluation
    assert sub["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-5)
    assert (out / "subnetwork.jax_export").exists() and (out / "subnetwork_checkpoint").is_dir()


def test_the_report_speaks_of_loss_and_perplexity(lm_run):
    out, report, logged = lm_run
    assert report["task"]["name"] == "language_modelling"
    assert report["task"]["context_length"] == 32
    for figures in (report["full"], report["subnetwork"], report["finetune"]):
        loss = figures["eval_loss"]
        assert math.isfinite(loss) and 0 < loss < math.log(128) + 1  # nats per character
        assert figures["eval_perplexity"] == pytest.approx(math.exp(loss))
        assert 0 <= figures["eval_accuracy"] <= 1
    assert report["task"]["eval_characters"] == 24 * 32  # every test window counted once
    assert report["phases"]["total_steps"] == 12 and len(report["history"]["epochs"]) == 3
    assert "eval_perplexity" in report["history"]["epochs"][-1]
    md = (out / "report.md").read_text()
    assert "| | params | MACs | validation loss (nats/char) | perplexity | next-char accuracy |" \
        in md
    sub = report["subnetwork"]
    assert (f"| sub-network | {sub['params'] / 1e6:.3f}M | {sub['macs'] / 1e6:.3f}M | "
            f"{sub['eval_loss']:.4f} | {sub['eval_perplexity']:.4f} |") in md
    assert "test accuracy" not in md
    assert (out / "loss_accuracy.png").stat().st_size > 0
    assert any(line.startswith("sub-network:") and "perplexity full" in line for line in logged)
    config = json.loads((out / "config.json").read_text())
    assert config["input_dtype"] == "int32" and config["num_classes"] == 128


def test_evaluation_counts_every_character_of_a_partial_last_batch():
    """The loss is the mean over characters, whatever the batches: one batch of 5 windows and
    the same windows as batches of 2, 2 and 1 give the same figures."""
    from asgssd_jax import train

    model = zoo.create("decoder_lm", **TINY)
    x = np.random.default_rng(0).integers(0, 128, (5, 9)).astype(np.int32)
    variables = model.init(jax.random.key(0), x[:, :8])
    one = train.evaluate(model.apply, variables, [(x[:, :-1], x[:, 1:])])
    split = train.evaluate(model.apply, variables,
                           [(x[i:i + 2, :-1], x[i:i + 2, 1:]) for i in (0, 2, 4)])
    assert one["loss"] == pytest.approx(split["loss"], rel=1e-5)
    assert one["accuracy"] == pytest.approx(split["accuracy"])
    logits = model.apply(variables, x[:, :-1])
    hits = np.asarray(logits.argmax(-1) == x[:, 1:])
    assert one["accuracy"] == pytest.approx(hits.mean())  # per character, not per window


def test_construct_rebuilds_the_lm_runs_subnetwork(lm_run, tmp_path, capsys):
    out, report, _ = lm_run
    assert cli.main(["construct", str(out), "--out", str(tmp_path / "c")]) == 0
    printed = capsys.readouterr().out
    assert f"zero groups: {report['zero_groups']}" in printed
    assert "max relative difference to the zeroed full network" in printed


@pytest.mark.parametrize("argv", [
    ["--model", "demonet", "--dataset", "python_source"],
    ["--model", "decoder_lm", "--dataset", "digits"],
    ["--model", "resnet18", "--dataset", "python_source"],
])
def test_a_model_and_dataset_that_do_not_pair_are_refused_with_the_pairs_that_work(
        argv, tmp_path, capsys):
    assert cli.main(["run", *argv, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "do not pair" in err and "Traceback" not in err
    assert "decoder_lm with python_source" in err and "digits" in err
    assert not (tmp_path / "r").exists()


def test_flags_of_the_other_task_are_refused(capsys):
    for argv, words in [
        (["--model", "decoder_lm", "--mixup", "0.2"],
         "--mixup applies to image classification only"),
        (["--model", "decoder_lm", "--data-dir", "/x"],
         "--data-dir applies to image classification only"),
        (["--context-length", "64"], "--context-length applies to next-character language"),
    ]:
        assert cli.main(["run", *argv]) == 2, argv
        assert words in capsys.readouterr().err


def test_decoder_lm_takes_the_language_model_defaults():
    cfg = RunConfig(model="decoder_lm")
    assert cfg.dataset == "python_source" and cfg.out == "runs/decoder_lm-python_source"
    assert (cfg.base, cfg.batch_size, cfg.steps_per_epoch) == ("adamw", 32, 50)
    assert cfg.epochs * cfg.steps_per_epoch == 300
    default = RunConfig()  # the quick start's run is unchanged
    assert (default.dataset, default.base, default.batch_size, default.learning_rate,
            default.target_sparsity, default.steps_per_epoch, default.out) == (
        "digits", "sgd", 64, 0.1, 0.5, None, "runs/demonet-digits")
    assert tasks.task_for("decoder_lm", cfg.dataset) is tasks.LANGUAGE_MODELLING


def test_the_zoo_listing_names_each_models_dataset(capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("decoder_lm"))
    assert "python_source" in line and "language modelling" in line
    assert "decoder_lm with python_source" in out


def test_the_default_lm_is_a_four_layer_model_with_eight_branches(capsys):
    """What `asgssd run --model decoder_lm` trains (its help states these sizes); `asgssd
    space` feeds it token ids."""
    assert cli.main(["space", "--model", "decoder_lm", "--out", ""]) == 0
    out = capsys.readouterr().out
    assert "decoder_lm: 771,200 params" in out and "8 removal structures in G_s" in out
    assert int(0.25 * 8) == RunConfig(model="decoder_lm").target_sparsity * 8 == 2
