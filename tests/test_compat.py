"""Third-party models through search space and surgery (a fast subset of
``python -m benchmarks.compat``): HuggingFace transformers' Flax models and equinox models, tiny
random configurations, traced at batch 2, every sub-network checked against the zeroed full
network at batch 3."""

import functools

import jax
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


def _check(space, case, chosen, probe):
    """The sub-network of the zero set ``chosen``: it runs, is smaller, equals the zeroed full
    network at the traced and at another batch size, and reads every input the full network
    reads."""
    r = compat.check_zero_set(space, case, chosen, probe)
    assert "failure" not in r, f"zero set {chosen}: {r['failure']}\n{r.get('traceback', '')}"
    assert r["rel_traced"] <= compat.EXACT, (chosen, r)
    assert r["rel_other"] <= compat.EXACT, (chosen, r)
    assert r["params_left"] < ag.count_params(case.variables)
    assert r["inputs_dropped"] == [], (chosen, r)
    return r


def _grouped(space, suffix):
    return any(p.endswith(suffix) for g in space.groups for p in g.param_paths)


@pytest.mark.parametrize("name, branches", [
    # every residual branch's last layer is in some group
    ("bert", [f"layer/{i}/{m}/dense/kernel" for i in (0, 1)
              for m in ("attention/output", "output")]),
    ("resnet", ["stages/0/layers/0/layer/layer_1/convolution/kernel",
                "stages/1/layers/0/layer/layer_1/convolution/kernel",
                "stages/1/layers/0/shortcut/convolution/kernel"]),  # a projection shortcut
])
def test_sub_networks_exact_at_another_batch_size(name, branches):
    case, space, probe = _space(name)
    assert all(_grouped(space, b) for b in branches), space.summary()
    assert len(probe.redrawn) == len(probe.other)  # the full network reads every input
    sets = compat.zero_sets(space)
    singles = [s for label, s in sets if len(s) == 1]
    assert len(singles) == space.num_groups  # each residual branch alone can go
    changed = 0
    for _, chosen in sets:
        r = _check(space, case, chosen, probe)
        changed += r["rel_zeroing"] > 0
    assert changed == len(sets)  # zeroing a group changes the output: the check is not vacuous


def test_weight_sharing_model_has_no_removal_structure_and_says_why():
    # ALBERT runs one shared layer num_hidden_layers times.
    _, space, _ = _space("albert")
    assert space.num_groups == 0
    assert "weight shared" in compat.why_empty(space)


def test_params_tree_with_a_top_level_array():
    # BART's params: {"final_logits_bias": array, "model": {...}}
    case, space, probe = _space("bart")
    chosen = compat.greedy_valid_set(space)
    _check(space, case, chosen, probe)
    sub = ag.construct_subnetwork(space, space.zero_groups(case.variables, chosen))
    assert set(sub.variables) == {"final_logits_bias", "model"}


def test_equinox_module_keeps_its_own_pytree():
    pytest.importorskip("equinox")
    case, space, probe = _space("eqx_cnn")
    assert space.num_groups == 2  # the two residual blocks
    chosen = compat.greedy_valid_set(space)
    assert chosen == (0, 1)  # the stem and the head still read the image
    _check(space, case, chosen, probe)
    sub = ag.construct_subnetwork(space, space.zero_groups(case.variables, chosen))
    assert type(sub.variables) is type(case.variables)
    assert jax.tree_util.tree_structure(sub.variables).num_leaves < len(
        jax.tree_util.tree_leaves(case.variables))


def test_sweep_reports_a_failing_model_instead_of_raising(monkeypatch):
    def broken():
        raise KeyError("state")

    monkeypatch.setitem(compat.MODELS, "broken", broken)
    row = compat.sweep_one("broken", TRACED, OTHER, seed=0)
    assert row["status"] == "error"
    assert row["note"] == "build: KeyError: 'state'"
    table = compat.markdown([row], TRACED, OTHER)
    assert "| broken |" in table and "**error**" in table
