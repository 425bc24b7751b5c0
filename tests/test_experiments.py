"""The paper's experiments: every configuration is valid, tables are laid out right, and a run
is read back only when its configuration is the same."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import asgssd_zoo as models
from asgssd_jax.pipeline import RunConfig
from experiments import configs
from experiments import run as exp_run


@pytest.mark.parametrize("smoke", [True, False])
@pytest.mark.parametrize("name", sorted(configs.EXPERIMENTS))
def test_every_run_is_a_valid_configuration(name, smoke):
    runs = configs.runs(name, smoke=smoke, data_dir="/data")
    assert runs
    for r in runs:
        r.config.validate()
        assert r.config.model in models.names()
        if smoke:  # data that is available without a download
            assert r.config.dataset in ("digits", "synthetic")
        else:
            assert r.config.data_dir == "/data" and r.config.lr_warmup_epochs == 0
    # one directory per run
    dirs = {exp_run._run_dir(Path("/o"), r) for r in runs}
    assert len(dirs) == len(runs)


def test_ablation_grid_is_three_optimizers_five_sparsities_three_seeds():
    runs = configs.runs("table4", smoke=True)
    assert len(runs) == 3 * 5 * 3
    assert {r.config.optimizer for r in runs} == {"h2spg", "dhspg", "proxsg_plus"}
    assert {r.config.target_sparsity for r in runs} == {0.1, 0.3, 0.5, 0.7, 0.9}
    assert {r.config.seed for r in runs} == {0, 1, 2}


def test_unknown_experiment_is_refused():
    with pytest.raises(KeyError, match="unknown experiment"):
        configs.runs("table9")


def _record(row, column, seed, acc, valid=True, params=1000):
    sub = {"params": params, "macs": 10 * params, "eval_accuracy": acc} if valid else None
    return {"row": row, "column": column, "seed": seed, "valid": valid, "zero_groups": [1],
            "K": 1, "num_groups": 19, "full": {"params": 2000, "macs": 20000,
                                               "eval_accuracy": acc},
            "subnetwork": sub, "first_zero_step": 10, "last_projection_step": 10,
            "train_seconds": 1.0, "paper": {}}


def test_grid_table_marks_invalid_cells_and_pairs_seeds():
    records = [_record("h2spg", "0.9", s, 0.5 + 0.1 * s) for s in range(3)]
    records += [_record("dhspg", "0.9", s, 0.0, valid=False) for s in range(3)]
    records += [_record("proxsg_plus", "0.9", s, 0.4 + 0.1 * s) for s in range(3)]
    table = exp_run._grid_table(records)
    assert "| h2spg (ours) | 60.00 ± 10.00 [0.001M] |" in table
    assert "X (3/3 invalid)" in table
    assert "| proxsg_plus minus h2spg, same seed | -10.00 (n=3) |" in table
    assert "3 invalid zero sets" in table


def test_a_run_is_read_back_only_with_the_same_configuration(tmp_path):
    cfg = dataclasses.asdict(RunConfig(out=str(tmp_path)))
    path = tmp_path / "report.json"
    assert not exp_run._same_config(path, cfg)
    path.write_text(json.dumps({"config": cfg}))
    assert exp_run._same_config(path, cfg)
    assert not exp_run._same_config(path, {**cfg, "seed": 1})
    # a report from before a field existed: the field counts as what the run did then
    old = {k: v for k, v in cfg.items() if k not in ("step_epochs", "lr_warmup_epochs")}
    path.write_text(json.dumps({"config": old}))
    assert exp_run._same_config(path, {**cfg, "lr_warmup_epochs": 0})
    assert not exp_run._same_config(path, cfg)  # the default warm-up of 1 epoch is new
