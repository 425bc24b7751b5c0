"""The model zoo: exact params and MACs of every registered network (MODEL_ZOO.md), and
forward passes of small variants of each family in eval and train mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import asgssd_jax as ag
import asgssd_zoo as models

# (params, MACs per example) at the registered input size. Params are the trainable tensors
# (BN scale and bias count, running statistics do not); MACs are the conv and dense
# multiplications (the paper's "FLOPs"). The paper's networks match MODEL_ZOO.md exactly; the
# others match the published torchvision / timm counts.
EXPECTED = {
    "demonet": (847_498, 202_795_264),
    "stacked_unets": (835_786, 175_768_832),
    "super_resnet": (7_764_530, 1_808_610_304),
    "regnet_200m": (2_321_946, 223_317_600),
    "regnet_400m": (4_779_338, 466_161_408),
    "regnet_600m": (5_676_330, 693_515_424),
    "regnet_800m": (6_594_186, 927_439_424),
    "darts_8cells": (4_083_058, 600_002_304),
    "darts_14cells": (25_532_896, 2_835_022_080),
    "ofa_pixel1_143": (9_221_888, 549_479_536),  # 224x224; 641.8 M at OFA's 240x240
    "resnet18": (11_173_962, 555_422_720),
    "resnet50": (25_557_032, 4_089_184_256),
    "densenet121": (7_978_856, 2_834_161_664),
    "mobilenet_v2": (3_504_872, 300_774_272),
    "vit_s16": (22_050_664, 4_598_882_304),  # includes the attention matmuls
    "decoder_lm": (771_200, 113_246_208),  # 128 tokens; includes the attention matmuls
}

# name -> (overrides giving a small network of the same family, input H = W). The widths are
# kept alike so that eager mode compiles few distinct shapes; the exact counts above already
# check how each full-size network is wired.
SMALL = {
    "stacked_unets": (dict(a_widths=(8, 8, 8, 8), b_widths=(8, 8, 8, 8), features=8), 8),
    "super_resnet": (dict(stages=((8, 1, 8, 1), (8, 2, 8, 1)), stem_width=8, head_width=8), 8),
    "regnet_800m": (dict(widths=(8, 8), depths=(1, 2), group_width=4, strides=(1, 2),
                         stem_width=8), 8),
    "darts_8cells": (dict(C=4, layers=3), 8),
    "darts_14cells": (dict(C=4, layers=3, steps=1), 64),  # op shapes as in darts_8cells
    "ofa_pixel1_143": (dict(blocks=((8, 3, 1, 8, "relu", False), (8, 5, 2, 16, "h_swish", True),
                                    (8, 3, 1, 16, "h_swish", True)),
                            stem_width=8, final_expand_width=16, feature_mix_width=16), 8),
    "resnet18": (dict(stage_sizes=(1, 1), num_filters=8), 8),
    "resnet50": (dict(stage_sizes=(1, 1), num_filters=8), 32),
    "densenet121": (dict(growth_rate=8, block_config=(1, 2), num_init_features=8), 32),
    "mobilenet_v2": (dict(width_multiplier=0.25, blocks=((1, 16, 1, 1), (6, 24, 2, 2)),
                          last_width=16), 16),
    "vit_s16": (dict(patch_size=4, hidden_dim=8, depth=2, num_heads=2, mlp_dim=16), 8),
}


def numpy_init(shapes, seed=0):
    """Variables for the shapes ``jax.eval_shape(model.init, ...)`` gives, drawn with numpy.

    A real ``model.init`` in eager mode compiles one initializer per parameter shape, which
    makes up most of the time of these small forward passes.
    """
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = path[-1].key
        if name == "kernel":  # LeCun normal
            return rng.normal(size=s.shape).astype(s.dtype) / np.sqrt(np.prod(s.shape[:-1]))
        if name in ("scale", "var"):
            return np.ones(s.shape, s.dtype)
        if name in ("bias", "mean"):
            return np.zeros(s.shape, s.dtype)
        return 0.02 * rng.normal(size=s.shape).astype(s.dtype)  # class token, positions

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def test_every_model_is_covered():
    assert set(models.names()) == set(EXPECTED)


@pytest.mark.parametrize("name", models.names())
def test_params_and_macs(name):
    model = models.create(name)
    x = jnp.zeros((1, *models.input_shape(name)), models.input_dtype(name))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)  # shapes only: no compute
    assert (ag.count_params(variables), ag.count_macs(model.apply, variables, x)) == \
        EXPECTED[name]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_forward(name):
    overrides, size = SMALL[name]
    model = models.create(name, num_classes=10, **overrides)
    channels = models.input_shape(name)[-1]
    x = jax.random.normal(jax.random.key(1), (2, size, size, channels))
    variables = numpy_init(jax.eval_shape(model.init, jax.random.key(0), x))

    y = model.apply(variables, x, train=False)
    assert y.shape == (2, 10)
    assert np.isfinite(y).all()

    y_train, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert y_train.shape == (2, 10)
    assert np.isfinite(y_train).all()
    if "batch_stats" in variables:
        old, new = variables["batch_stats"], updates["batch_stats"]
        assert jax.tree_util.tree_structure(old) == jax.tree_util.tree_structure(new)
        assert any(not np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(old),
                                                         jax.tree_util.tree_leaves(new)))


def test_zoo_imports_beside_a_users_own_models_module(tmp_path):
    """The zoo installs as ``asgssd_zoo``: a project with its own ``models.py`` keeps it."""
    import subprocess
    import sys

    (tmp_path / "models.py").write_text("def create(name):\n    return 'mine'\n")
    code = ("import models, asgssd_zoo as zoo\n"
            "assert models.create('demonet') == 'mine'\n"
            "assert zoo.create('demonet').__class__.__name__ == 'DemoNet'\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


LM_SMALL = dict(num_classes=32, dim=16, depth=3, num_heads=4, num_kv_heads=2, mlp_dim=24)


def test_decoder_lm_is_causal_and_scan_computes_the_unrolled_stack():
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 32)
    unrolled = models.create("decoder_lm", **LM_SMALL)
    scanned = models.create("decoder_lm", scan_layers=True, **LM_SMALL)
    v = unrolled.init(jax.random.key(0), tokens)
    y = unrolled.apply(v, tokens)
    assert y.shape == (2, 12, 32) and np.isfinite(y).all()

    # Changing a later token leaves earlier positions' logits unchanged (causal mask).
    changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 32)
    y2 = unrolled.apply(v, changed)
    np.testing.assert_allclose(y2[:, :7], y[:, :7], rtol=1e-5, atol=1e-6)
    assert not np.allclose(y2[:, 7:], y[:, 7:])

    # The same parameters stacked on a leading axis give the same logits under nn.scan.
    p = v["params"]
    layers = [p[f"layers_{i}"] for i in range(3)]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
    sp = {k: p[k] for k in ("embed", "norm", "lm_head")} | {"layers": {"block": stacked}}
    assert jax.tree_util.tree_structure(sp) == jax.tree_util.tree_structure(
        jax.eval_shape(scanned.init, jax.random.key(0), tokens)["params"])
    np.testing.assert_allclose(scanned.apply({"params": sp}, tokens), y, rtol=1e-5, atol=1e-6)
