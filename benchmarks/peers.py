"""Against the PyTorch peers: search space vs Torch-Pruning, H2SPG's train step vs SGD.

    pip install -e ".[bench]"
    python benchmarks/peers.py [--models resnet18 densenet121] [--batch N] [--repeats 5]

For each zoo network, with its PyTorch twin from ``benchmarks/torch_models.py`` (same layers,
same parameter count, asserted, and the Flax weights copied in, so that both compute the same
logits, also asserted):

Table 1: time to build our search space, ``generate_search_space(model.apply, variables, x,
train=False)`` with jaxpr tracing included, against Torch-Pruning's
``DependencyGraph().build_dependency(model, example_inputs=x)`` alone and followed by
``get_all_groups`` (the classifier ignored, as when pruning), at batch 1 and the zoo's input
size (NHWC for Flax, NCHW for PyTorch), PyTorch on one thread (see ``search_space_row``); and
the number of groups each finds. Both are timed as ``timeit`` does, garbage collector off.

Table 2: one training step (forward, cross-entropy, backward, update) on the same batch: our
jitted step (``benchmarks/optimizer_step.py``'s) with ``optax.sgd(0.1, momentum=0.9)`` and with
H2SPG on that same base (in its warm-up phase and in its hybrid phase after projection,
K = half of the groups), against ``torch.optim.SGD(lr=0.1, momentum=0.9)``
(``torch.set_num_threads(--torch-threads)``, by default the cores this process may use, and
also with 1 thread: on a loaded machine PyTorch's OpenMP threads can lose more to
oversubscription than they gain).

Every timing is the median over ``--repeats`` rounds after a warm-up; within a round the
contenders run one after the other (the order rotating between rounds), and each ratio is the
median of the per-round ratios, so that load drifts on a shared machine hit both sides alike.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import sys
import time
import warnings
from importlib.metadata import version

try:
    import torch
    import torch.nn.functional as F
    import torch_pruning as tp
except ImportError as e:
    sys.exit(f"benchmarks/peers.py needs PyTorch and Torch-Pruning ({e}); install them with\n"
             '    pip install -e ".[bench]"')

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch_models
from optimizer_step import _Clocks, _train_step

import asgssd_jax as ag
import asgssd_zoo as models

DEFAULT_BATCH = {"resnet18": 32, "densenet121": 4}
STEPS = 2  # train steps per timing; H2SPG's warm-up phase is longer than that
SPARSITY = 0.5


def _median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den))


def _rounds(contenders: dict, repeats: int) -> dict[str, list[float]]:
    """Runs every contender once (warm-up), then ``repeats`` rounds of all of them, in an order
    that rotates between rounds; returns each one's timings, in round order."""
    names = list(contenders)
    for f in contenders.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            times[k].append(contenders[k]())
    return times


def _timed(f):
    """``f`` timed as ``timeit`` does: the garbage collector off (after a collection), so that
    a collection set off by one side does not scan the other side's objects on its clock."""
    def run() -> float:
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter()
            f()
            return time.perf_counter() - t0
        finally:
            gc.enable()
    return run


class Twins:
    """A zoo network in Flax and in PyTorch, with the same weights."""

    def __init__(self, name: str):
        self.name = name
        self.model = models.create(name)
        self.shape = models.input_shape(name)
        self.num_classes = models.spec(name).num_classes
        x1 = jax.random.normal(jax.random.key(1), (2, *self.shape))
        variables = self.model.init(jax.random.key(0), x1)
        # one train-mode pass, so that the BN statistics copied below are not trivial
        _, new = self.model.apply(variables, x1, train=True, mutable=["batch_stats"])
        self.variables = {"params": variables["params"], "batch_stats": new["batch_stats"]}
        self.torch_model = torch_models.create(name)
        torch_models.load_flax_variables(self.torch_model, self.variables)
        self.params = sum(a.size for a in jax.tree_util.tree_leaves(self.variables["params"]))
        self.torch_params = torch_models.count_params(self.torch_model)
        assert self.params == self.torch_params, (name, self.params, self.torch_params)
        self.logit_error = self._check_outputs(x1)

    def nchw(self, x: jax.Array) -> torch.Tensor:
        return torch.from_numpy(np.array(np.asarray(x).transpose(0, 3, 1, 2), order="C"))

    def _check_outputs(self, x: jax.Array) -> float:
        """Max |difference| of the two networks' logits in inference mode, relative to the
        largest logit; asserted small."""
        ours = np.asarray(self.model.apply(self.variables, x, train=False))
        self.torch_model.eval()
        with torch.no_grad():
            theirs = self.torch_model(self.nchw(x)).numpy()
        err = float(np.abs(ours - theirs).max() / np.abs(ours).max())
        assert err < 1e-4, (self.name, err)
        return err


def search_space_row(tw: Twins, repeats: int) -> dict:
    x = jnp.zeros((1, *tw.shape))
    x_t = tw.nchw(x)
    m = tw.torch_model.eval()
    box: dict = {}

    def ours():
        box["space"] = ag.generate_search_space(tw.model.apply, tw.variables, x, train=False)

    def dependency_graph():
        box["dg"] = tp.DependencyGraph().build_dependency(m, example_inputs=x_t)

    def dependency_graph_and_groups():
        dg = tp.DependencyGraph().build_dependency(m, example_inputs=x_t)
        head = m.linear if hasattr(m, "linear") else m.classifier
        box["groups"] = list(dg.get_all_groups(ignored_layers=[head]))

    # One PyTorch thread here: the build is Python work around a batch-1 forward, and next to
    # JAX's thread pool in this process two OpenMP threads made it up to 40x slower (and
    # erratic) on a loaded 2-core machine, against a steady 1x alone.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = _rounds({"ours": _timed(ours), "tp": _timed(dependency_graph),
                     "tp+groups": _timed(dependency_graph_and_groups)}, repeats)
    finally:
        torch.set_num_threads(threads)
    return {
        "ours": statistics.median(t["ours"]),
        "tp": statistics.median(t["tp"]),
        "tp+groups": statistics.median(t["tp+groups"]),
        "tp/ours": _median_ratio(t["tp"], t["ours"]),
        "tp+groups/ours": _median_ratio(t["tp+groups"], t["ours"]),
        "our_groups": box["space"].num_groups,
        "tp_groups": len(box["groups"]),
        "space": box["space"],
    }


def train_step_rows(tw: Twins, space: ag.SearchSpace, batch: int, repeats: int,
                    torch_threads: int) -> dict:
    x = jax.random.normal(jax.random.key(2), (batch, *tw.shape))
    y = jnp.arange(batch) % tw.num_classes
    start = (tw.variables["params"], tw.variables["batch_stats"])

    def jax_contender(tx, step, steps_before: int):
        params, bs, state = *start, tx.init(start[0])
        for _ in range(steps_before):  # walk into the phase for real
            params, bs, state = step(params, bs, state)
        begin = jax.block_until_ready((params, bs, state))

        def run() -> float:
            p, b, s = begin
            clocks = _Clocks()
            for _ in range(STEPS):
                p, b, s = step(p, b, s)
            jax.block_until_ready(p)
            return clocks.per(STEPS)[0]
        return run

    warmup, projection = STEPS + 1, 2
    h2 = ag.h2spg(space, 0.1, SPARSITY, warmup_steps=warmup, projection_steps=projection,
                  base="sgd", momentum=0.9)
    h2_step = _train_step(tw.model, h2, x, y)
    sgd = optax.sgd(0.1, momentum=0.9)
    m = tw.torch_model.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    x_t, y_t = tw.nchw(x), torch.from_numpy(np.asarray(y, dtype=np.int64))

    def torch_sgd(threads: int):
        def run() -> float:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            for _ in range(STEPS):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(m(x_t), y_t).backward()
                opt.step()
            seconds = (time.perf_counter() - t0) / STEPS
            torch.set_num_threads(before)
            return seconds
        return run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ag.SparsityWarning)
        contenders = {
            "optax.sgd": jax_contender(sgd, _train_step(tw.model, sgd, x, y), 0),
            "H2SPG warm-up": jax_contender(h2, h2_step, 0),  # one compilation for both phases
            "H2SPG hybrid": jax_contender(h2, h2_step, warmup + projection),
        }
    torch_names = []
    for n in sorted({torch_threads, 1}, reverse=True):
        torch_names.append(f"torch.optim.SGD, {n} thread{'s' * (n > 1)}")
        contenders[torch_names[-1]] = torch_sgd(n)
    t = _rounds(contenders, repeats)
    return {k: (statistics.median(v), _median_ratio(v, t["optax.sgd"]),
                *(_median_ratio(v, t[n]) for n in torch_names)) for k, v in t.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "densenet121"],
                        choices=sorted(torch_models.MODELS))
    parser.add_argument("--batch", type=int, default=None,
                        help="train-step batch size (default: "
                             + ", ".join(f"{k} {v}" for k, v in DEFAULT_BATCH.items()) + ")")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--torch-threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch.set_num_threads (default: the cores this process may use); "
                             "the train step is also timed with 1 thread")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(args.torch_threads)

    print(f"{datetime.date.today()}, {platform.machine()}, {cores} CPU cores, "
          f"jax {jax.__version__} (flax {flax.__version__}, "
          f"optax {optax.__version__}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), torch-pruning {version('torch-pruning')}; "
          f"median of {args.repeats} rounds after a warm-up\n", flush=True)
    twins, spaces, steps = {}, {}, {}
    for name in args.models:
        twins[name] = tw = Twins(name)
        spaces[name] = search_space_row(tw, args.repeats)
        batch = args.batch or DEFAULT_BATCH[name]
        steps[name] = (batch, train_step_rows(tw, spaces[name]["space"], batch, args.repeats,
                                              args.torch_threads))

    print("Search space (batch 1, zoo input size; PyTorch on 1 thread; garbage collector off "
          "while timed)\n")
    print("| network | input | params Flax | params torch | max rel. logit diff "
          "| ours (s) | TP graph (s) | TP graph + groups (s) | TP/ours | TP+groups/ours "
          "| our groups | TP groups |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in spaces.items():
        tw = twins[name]
        h, w, c = tw.shape
        print(f"| {name} | {h}x{w}x{c} | {tw.params:,} | {tw.torch_params:,} "
              f"| {tw.logit_error:.1e} | {r['ours']:.3f} | {r['tp']:.3f} | {r['tp+groups']:.3f} "
              f"| {r['tp/ours']:.2f} | {r['tp+groups/ours']:.2f} | {r['our_groups']} "
              f"| {r['tp_groups']} |")
    print("\nOurs: removal structures, the parts of the segment graph that can be erased "
          "whole with the network staying valid (H2SPG zeroes K of them). Torch-Pruning: "
          "channel groups, the sets of coupled layers whose channels are pruned together "
          "(classifier ignored). Different notions: the counts are not comparable.\n")

    print("Train step (forward, cross-entropy, backward, update)\n")
    torch_columns = [k for k in next(iter(steps.values()))[1] if k.startswith("torch")]
    print("| network | batch | optimizer | ms/step | x optax.sgd | "
          + " | ".join(f"x {k}" for k in torch_columns) + " |")
    print("|---|---:|---|---:|---:|" + "---:|" * len(torch_columns))
    for name, (batch, rows) in steps.items():
        for opt_name, (sec, *ratios) in rows.items():
            print(f"| {name} | {batch} | {opt_name} | {sec * 1e3:.1f} | "
                  + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    print(f"\nH2SPG: K = {SPARSITY} of the groups, base optax.sgd(0.1, momentum=0.9); "
          "warm-up = before the search, hybrid = after projection (K groups exactly zero). "
          "Ours jitted (compilation excluded), float32 on both sides, JAX with XLA's default "
          "CPU threading.")


if __name__ == "__main__":
    main()
