"""experiments/h2spg_projection.py reads the projection figures out of a run's report.json."""

import pytest

from experiments import h2spg_projection as hp


def _report(zeroing, subnetwork=True):
    # 2 epochs of 4 steps, 1 of warm-up and 1 of projection: the last projection step is 8.
    losses = [1.0] * 5 + [1.0, 2.0, 3.0] + [4.0, 5.0, 6.0] + [0.0] * 5
    return {
        "config": {"epochs": 4, "warmup_epochs": 1, "projection_epochs": 1, "fade_out": False},
        "history": {"steps": [{"step": i + 1, "loss": x} for i, x in enumerate(losses[:16])]},
        "search_space": {"K": 2},
        "zero_groups": [1, 3],
        "valid": subnetwork,
        "zeroing": zeroing,
        "full": {"eval_accuracy": 0.9},
        "subnetwork": {"eval_accuracy": 0.875, "params": 41_500, "macs": 2_250_000} if subnetwork else None,
        "baseline": {"eval_accuracy": 0.8},
        "train_seconds": 12.0,
    }


def test_loss_jump_compares_the_steps_around_the_last_projection_step():
    assert hp.loss_jump(_report([])) == (pytest.approx(5.0 - 2.0), 8)


def test_rows_count_the_groups_the_test_zeroed():
    zeroing = [{"group": 3, "step": 6, "by": "test", "relative_norm": 0.02},
               {"group": 1, "step": 8, "by": "safeguard", "relative_norm": 0.25}]
    s = hp.summary(_report(zeroing))
    assert (s["by_test"], s["steps"], s["max_relative_norm"]) == (1, [6, 8], 0.25)
    row = hp.table4_row("dhspg", 0.5, 0, "paper", s, "abc1234").split(" | ")
    assert row[3:10] == ["87.50", "2 (2)", "1", "6, 8", "0.250", "+3.000", "abc1234 |"]
    default = hp.default_row(0, "fade_out", s, "abc1234")
    assert "g1 (step 8, safeguard, 0.250), g3 (step 6, test, 0.020) | 1 of 2" in default
    assert "| 90.00 | 87.50 | 80.00 | +7.50 | 0.042M / 2.2M | +3.000 | 12 | abc1234 |" in default


def test_an_invalid_zero_set_is_an_x_and_a_report_without_zeroing_is_unknown():
    s = hp.summary(_report(None, subnetwork=False))
    row = hp.table4_row("dhspg", 0.9, 0, "paper", s, "v")
    assert "| X | 2 (2) | ? | - | - |" in row


def test_the_summary_averages_over_seeds_and_counts_invalid_zero_sets_apart():
    test = [{"group": 3, "step": 6, "by": "test", "relative_norm": 0.02},
            {"group": 1, "step": 7, "by": "test", "relative_norm": 0.03}]
    cut = [{"group": 3, "step": 8, "by": "safeguard", "relative_norm": 0.02},
           {"group": 1, "step": 8, "by": "safeguard", "relative_norm": 0.03}]
    cells = {("h2spg", 0.5, 0, "paper"): hp.summary(_report(test)),
             ("h2spg", 0.5, 1, "paper"): {**hp.summary(_report(test)), "sub": 0.925},
             ("h2spg", 0.9, 0, "paper"): hp.summary(_report(test, subnetwork=False)),
             ("h2spg", 0.5, 0, "fade_out"): hp.summary(_report(cut))}
    lines = hp.table4_summary(cells, ["h2spg", "dhspg"], [0.5, 0.9]).split("\n")
    assert len(lines) == 4  # header, rule, one line per projection of h2spg; dhspg has no runs
    assert lines[2] == ("| h2spg | half-space test (default) | 90.00 ± 3.54 (2) | X in 1 (1) "
                        "| 6 of 6 | +3.000 to +3.000 |")
    assert lines[3] == ("| h2spg | fade-out (`fade_out=True`) | 87.50 ± 0.00 (1) | - "
                        "| 0 of 2 | +3.000 to +3.000 |")
