"""Prints the zoo's params/MACs table (models/README.md) next to the paper's baselines.

    python -m asgssd_zoo.make_table > models/table.md

MACs follow the paper's convention (multiplications of conv and dense/dot ops per example),
counted by ``asgssd_jax.count_macs`` from the traced jaxpr; params are the ``params``
collection. Variables are abstract (``jax.eval_shape``), so even ImageNet networks are quick.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import asgssd_jax as ag
import asgssd_zoo as models

# name -> (paper params M, paper MACs M, source)
PAPER = {
    "demonet": (0.82, 209, "paper Table 1"),
    "stacked_unets": (0.80, 184, "paper Table 1"),
    "darts_8cells": (4.05, 614, "paper Table 5"),
    "ofa_pixel1_143": (9.1, 511, "paper Table 6"),
}
# RegNetX with the ImageNet stem, to check the block code against the RegNet paper.
REGNET_IMAGENET = {"200m": (2.7, 200), "400m": (5.2, 400), "600m": (6.2, 600),
                   "800m": (7.3, 800)}


def measure(name: str, shape=None, **overrides):
    model = models.create(name, **overrides)
    x = jax.ShapeDtypeStruct((1, *(shape or models.input_shape(name))), models.input_dtype(name))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    space = ag.generate_search_space(model.apply, variables, x, train=False)
    return (ag.count_params(variables) / 1e6, ag.count_macs(model.apply, variables, x) / 1e6,
            space.num_groups)


def _gap(ours: float, ref: float | None) -> str:
    return f"{100 * (ours - ref) / ref:+.1f}%" if ref else ""


def main() -> None:
    print("| network | input | params (M) | MACs (M) | removal structures | paper params (M) "
          "| paper MACs (M) | gap params | gap MACs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in models.names():
        shape = models.input_shape(name)
        p, m, g = measure(name)
        ref = PAPER.get(name)
        rp, rm = (ref[0], ref[1]) if ref else (None, None)
        size = "x".join(map(str, shape)) + (" tokens" if len(shape) == 1 else "")
        print(f"| {name} | {size} | {p:.3f} | {m:.1f} | {g} | "
              f"{rp or ''} | {rm or ''} | {_gap(p, rp)} | {_gap(m, rm)} |", flush=True)
        if name == "ofa_pixel1_143":
            p, m, g = measure(name, shape=(240, 240, 3))
            print(f"| {name} | 240x240x3 | {p:.3f} | {m:.1f} | {g} | {rp} | {rm} | "
                  f"{_gap(p, rp)} | {_gap(m, rm)} |", flush=True)
    from asgssd_zoo.regnet import REGNETX

    for key, (rp, rm) in REGNET_IMAGENET.items():
        widths, depths, gw = REGNETX[key]
        p, m, g = measure(f"regnet_{key}", shape=(224, 224, 3), num_classes=1000,
                          stem_width=32, stem_strides=2, strides=(2, 2, 2, 2))
        print(f"| regnet_{key}, ImageNet layout | 224x224x3 | {p:.3f} | {m:.1f} | {g} | {rp} | "
              f"{rm} | {_gap(p, rp)} | {_gap(m, rm)} |", flush=True)


if __name__ == "__main__":
    main()
