"""HuggingFace transformers' Flax models through search space and surgery (a fast subset of
``python -m benchmarks.compat``): tiny random configurations, traced at batch 2, every
sub-network checked against the zeroed full network at batch 3."""

import pytest

pytest.importorskip("transformers")

import asgssd_jax as ag  # noqa: E402
from benchmarks import compat  # noqa: E402

TRACED, OTHER = 2, 3


@pytest.fixture(scope="module", autouse=True)
def _shims():
    compat.apply_shims()


def _space(name):
    case = compat.MODELS[name]()
    traced, other = case.inputs(TRACED), case.inputs(OTHER)
    space = ag.generate_search_space(case.apply_fn, case.variables, *traced)
    return case, space, traced, other


def _assert_exact(space, case, chosen, traced, other):
    r = compat.check_zero_set(space, case, chosen, traced, other)
    assert "failure" not in r, f"zero set {chosen}: {r['failure']}\n{r.get('traceback', '')}"
    assert r["rel_traced"] <= compat.EXACT, (chosen, r)
    assert r["rel_other"] <= compat.EXACT, (chosen, r)
    assert r["params_left"] < ag.count_params(case.variables)
    return r


@pytest.mark.parametrize("name, num_groups", [
    ("bert", 4),  # two layers x (self-attention branch, feed-forward branch)
    ("resnet", 3),  # basic blocks with identity shortcuts, BatchNorm in batch_stats
])
def test_sub_networks_exact_at_another_batch_size(name, num_groups):
    case, space, traced, other = _space(name)
    assert space.num_groups == num_groups
    sets = compat.zero_sets(space)
    singles = [s for label, s in sets if len(s) == 1]
    assert len(singles) == num_groups  # each residual branch alone keeps the network valid
    changed = 0
    for _, chosen in sets:
        r = _assert_exact(space, case, chosen, traced, other)
        changed += r["rel_zeroing"] > 0
    assert changed == len(sets)  # zeroing a group changes the output: the check is not vacuous


def test_weight_sharing_model_has_no_removal_structure_and_says_why():
    # ALBERT runs one shared layer num_hidden_layers times.
    _, space, _, _ = _space("albert")
    assert space.num_groups == 0
    assert "weight shared" in compat.why_empty(space)


@pytest.mark.parametrize("name", [
    pytest.param("bart", marks=pytest.mark.xfail(strict=True, reason=(
        "sub.apply refuses a params tree with a top-level array (BART's final_logits_bias "
        "next to 'model'): ApplyScopeInvalidVariablesTypeError, the sub-network does not keep "
        "the user's pytree"))),
    pytest.param("wav2vec2", marks=pytest.mark.xfail(strict=True, reason=(
        "wav2vec2's weight-normalised positional conv (g * v / ||v||) is a removal structure, "
        "but at zero it is 0/0: the zeroed full network is NaN (zero-invariance is not "
        "checked)"))),
])
def test_greedy_maximal_zero_set_exact(name):
    case, space, traced, other = _space(name)
    assert space.num_groups > 0
    _assert_exact(space, case, compat.greedy_valid_set(space), traced, other)


def test_sweep_reports_a_failing_model_instead_of_raising(monkeypatch):
    def broken():
        raise KeyError("state")

    monkeypatch.setitem(compat.MODELS, "broken", broken)
    row = compat.sweep_one("broken", TRACED, OTHER, seed=0)
    assert row["status"] == "error"
    assert row["note"] == "build: KeyError: 'state'"
    table = compat.markdown([row], TRACED, OTHER)
    assert "| broken |" in table and "**error**" in table
