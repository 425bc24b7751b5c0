"""HuggingFace transformers' Flax models through search space and surgery (a fast subset of
``python -m benchmarks.compat``): tiny random configurations, traced at batch 2, every
sub-network checked against the zeroed full network at batch 3."""

import functools

import pytest

pytest.importorskip("transformers")

import asgssd_jax as ag  # noqa: E402
from benchmarks import compat  # noqa: E402

TRACED, OTHER = 2, 3


@pytest.fixture(scope="module", autouse=True)
def _shims():
    compat.apply_shims()


@functools.lru_cache(maxsize=None)
def _space(name):
    case = compat.MODELS[name]()
    probe = compat.Probe.of(case, TRACED, OTHER)
    space = ag.generate_search_space(case.apply_fn, case.variables, *probe.traced)
    return case, space, probe


def _assert_exact(space, case, chosen, probe):
    r = compat.check_zero_set(space, case, chosen, probe)
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
    case, space, probe = _space(name)
    assert space.num_groups == num_groups
    sets = compat.zero_sets(space)
    singles = [s for label, s in sets if len(s) == 1]
    assert len(singles) == num_groups  # each residual branch alone keeps the network valid
    changed = 0
    for _, chosen in sets:
        r = _assert_exact(space, case, chosen, probe)
        changed += r["rel_zeroing"] > 0
    assert changed == len(sets)  # zeroing a group changes the output: the check is not vacuous


@pytest.mark.parametrize("name", [
    "resnet",
    pytest.param("bert", marks=pytest.mark.xfail(strict=True, reason=(
        "is_valid accepts removing both attention branches (one input reaches the output), "
        "after which the logits no longer read attention_mask: validity must keep every "
        "(input, output) pair connected"))),
])
def test_greedy_maximal_zero_set_keeps_every_input(name):
    case, space, probe = _space(name)
    assert len(probe.redrawn) == len(case.inputs(OTHER, 0))  # the full network reads them all
    r = compat.check_zero_set(space, case, compat.greedy_valid_set(space), probe)
    assert r["inputs_dropped"] == []


def test_weight_sharing_model_has_no_removal_structure_and_says_why():
    # ALBERT runs one shared layer num_hidden_layers times.
    _, space, _ = _space("albert")
    assert space.num_groups == 0
    assert "weight shared" in compat.why_empty(space)


def test_weight_normalised_conv_is_excluded_and_the_rest_exact():
    # wav2vec2's positional conv is weight-normalised, g * v / ||v||: 0/0 at zero.
    case, space, probe = _space("wav2vec2")
    assert not any("pos_conv_embed" in p for g in space.groups for p in g.param_paths)
    assert any("pos_conv_embed" in p for ex in space.excluded for p in ex.param_paths)
    assert space.num_groups == 4
    _assert_exact(space, case, compat.greedy_valid_set(space), probe)


@pytest.mark.xfail(strict=True, reason=(
    "sub.apply refuses a params tree with a top-level array (BART's final_logits_bias next to "
    "'model'): ApplyScopeInvalidVariablesTypeError, the sub-network does not keep the user's "
    "pytree"))
def test_params_tree_with_a_top_level_array():
    case, space, probe = _space("bart")
    assert space.num_groups > 0
    _assert_exact(space, case, compat.greedy_valid_set(space), probe)


def test_sweep_reports_a_failing_model_instead_of_raising(monkeypatch):
    def broken():
        raise KeyError("state")

    monkeypatch.setitem(compat.MODELS, "broken", broken)
    row = compat.sweep_one("broken", TRACED, OTHER, seed=0)
    assert row["status"] == "error"
    assert row["note"] == "build: KeyError: 'state'"
    table = compat.markdown([row], TRACED, OTHER)
    assert "| broken |" in table and "**error**" in table
