"""Cost of H2SPG per step against its base optimizer, and of the one-time hierarchical search.

    python benchmarks/optimizer_step.py [--repeats 7] [--no-darts] [--compile MODEL ...] [--floor]

Table 1: DemoNet (Fashion-MNIST shapes), batch 64, on this CPU. For each base optimizer
(``optax.sgd(momentum=0.9)`` and ``optax.adamw``) and each H2SPG phase, the jitted train step
(forward + backward + update + ``apply_updates``) and the jitted ``update`` alone, as time per
step and as the ratio to the base optimizer alone, all measured in this run with the
configurations interleaved (minimum over ``--repeats`` rounds). Ratios are given by wall time
and by this process's CPU time, which other processes on a shared machine disturb less.
"search step" is the single update at ``count == warmup_steps`` that also runs the
hierarchical search.

Table 2: the hierarchical search alone on DARTS-8's search space (464 groups) and on synthetic
DARTS-like segment graphs of about 500 and 1000 groups, median over random saliencies: in-graph
(``hierarchical_search``, jitted, after compilation) and on the host
(``host_hierarchical_search``, the NumPy passes H2SPG runs through its one callback).

Table 3 (``--compile``, default resnet18 super_resnet darts_8cells; ``--compile none`` skips
it): compile time of the jitted train step (forward + backward + update + ``apply_updates``,
batch ``--compile-batch``, default 2: compile time barely depends on it) and of the jitted
``update`` alone, ``optax.sgd(momentum=0.9)`` against H2SPG on it, wall and CPU time of
``jit(...).lower(...).compile()``, the base and H2SPG interleaved, minimum over
``--compile-rounds`` (default 1). Every table says the machine's load average when measured:
on a shared machine compile times move by 2x with the load, so compare ratios of one run.
``--floor`` adds rows for :func:`two_pass_floor`, the two passes over the leaves that any
per-group hybrid step compiles on top of its base optimizer (a lower bound for H2SPG), and
for :func:`flat_floor`, the same passes over one flat buffer (the other layout).

Goals (the PyTorch peer here: OTO's HESSO ``optimizer.step()`` costs 1.96-2.39x
``torch.optim.SGD``'s, the whole step 1.0-1.05x): in the hybrid phase the whole step at most
1.05x the base optimizer and the update alone at most 1.5x; the search under 50 ms for 500
groups; compiling the train step at most 1.3x the base optimizer's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import optax

import asgssd_jax as ag
import asgssd_zoo as models
from asgssd_jax.optim.search import (
    SearchGraph,
    hierarchical_search,
    host_hierarchical_search,
    search_order,
)

BATCH = 64


def _demonet():
    model = models.create("demonet")
    x = jax.random.normal(jax.random.key(1), (BATCH, *models.input_shape("demonet")))
    y = jnp.arange(BATCH) % 10
    variables = model.init(jax.random.key(0), x[:2])
    space = ag.generate_search_space(model.apply, variables, x[:2], train=False)
    return model, space, variables, x, y


def _train_step(model, tx, x, y):
    def loss_fn(params, batch_stats):
        out, new = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                               mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
        return loss, new["batch_stats"]

    @jax.jit
    def step(params, batch_stats, opt_state):
        (_, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state

    return step


class _Case:
    """One optimizer in one phase: a train step and an update, with states to start from."""

    def __init__(self, model, tx, variables, x, y, steps_before: int):
        self.step = _train_step(model, tx, x, y)
        self.update = jax.jit(tx.update)
        params, bs = variables["params"], variables["batch_stats"]
        state = tx.init(params)
        for _ in range(steps_before):  # walk into the phase for real
            params, bs, state = self.step(params, bs, state)
        self.start = (params, bs, state)
        self.grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": p, "batch_stats": bs}, x), y).mean())(params)
        jax.block_until_ready(self.step(*self.start))
        jax.block_until_ready(self.update(self.grads, state, params))

    def time_step(self, n: int) -> tuple[float, float]:
        params, bs, state = self.start
        clocks = _Clocks()
        for _ in range(n):
            params, bs, state = self.step(params, bs, state)
        jax.block_until_ready(params)
        return clocks.per(n)

    def time_update(self, n: int) -> tuple[float, float]:
        params, _, state = self.start
        clocks = _Clocks()
        for _ in range(n):
            updates, state = self.update(self.grads, state, params)
        jax.block_until_ready(updates)
        return clocks.per(n)


class _Clocks:
    """Wall time and this process's CPU time (all threads): on a shared machine the second
    is less disturbed by other processes."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def per(self, n: int) -> tuple[float, float]:
        return (time.perf_counter() - self.wall) / n, (time.process_time() - self.cpu) / n


def _time_search_step(model, make_tx, variables, x, y, warmup, repeats):
    """The train step and the update at count == warmup_steps, from the same state each time."""
    case = _Case(model, make_tx(), variables, x, y, steps_before=warmup)
    params, bs, state = case.start
    steps, updates = [], []
    for _ in range(repeats):
        clocks = _Clocks()
        jax.block_until_ready(case.step(params, bs, state))
        steps.append(clocks.per(1))
        clocks = _Clocks()
        jax.block_until_ready(case.update(case.grads, state, params))
        updates.append(clocks.per(1))
    return _best(steps), _best(updates)


def _best(samples: list[tuple[float, float]]) -> tuple[float, float]:
    """Minimum wall time and minimum CPU time over the rounds."""
    return min(s[0] for s in samples), min(s[1] for s in samples)


def optimizer_table(repeats: int) -> None:
    load_before = _load()
    model, space, variables, x, y = _demonet()
    warm = 3
    bases = {
        "sgd(momentum=0.9)": lambda: optax.sgd(0.05, momentum=0.9),
        "adamw": lambda: optax.adamw(1e-3, weight_decay=1e-4),
    }
    rows = []
    for base_name, make_base in bases.items():
        def h2(warmup, proj, make_base=make_base):
            return ag.h2spg(space, 0.05, 0.6, warmup_steps=warmup, projection_steps=proj,
                            base=make_base())

        cases = {
            "base alone": _Case(model, make_base(), variables, x, y, 0),
            "warm-up": _Case(model, h2(10**7, 1), variables, x, y, 0),
            "projection": _Case(model, h2(warm, 10**7), variables, x, y, warm + 1),
            "trained (after projection)": _Case(model, h2(warm, 2), variables, x, y, warm + 2),
        }
        step_t = {k: [] for k in cases}
        upd_t = {k: [] for k in cases}
        for _ in range(repeats):
            for k, c in cases.items():  # interleaved, so that load drifts hit all alike
                step_t[k].append(c.time_step(3))
                for _ in range(4):
                    upd_t[k].append(c.time_update(50))
        search_step, search_update = _time_search_step(
            model, lambda: h2(warm, 10**7), variables, x, y, warm, repeats)
        s0, u0 = _best(step_t["base alone"]), _best(upd_t["base alone"])
        results = {k: (_best(step_t[k]), _best(upd_t[k])) for k in cases}
        results["search step (once)"] = (search_step, search_update)
        for k, (s, u) in results.items():
            rows.append((base_name, k, s[0] * 1e3, s[0] / s0[0], s[1] / s0[1],
                         u[0] * 1e6, u[0] / u0[0], u[1] / u0[1]))

    print(f"load {load_before} before, {_load()} after (1-minute load average / CPUs)")
    print(f"DemoNet, batch {BATCH}, {jax.device_count()} {jax.devices()[0].platform} device(s); "
          f"{space.num_groups} groups, K = {int(0.6 * space.num_groups)}; minimum over "
          f"{repeats} interleaved rounds; ratios to the base alone by wall time and by this "
          "process's CPU time")
    print(f"{'base':<18}  {'phase':<27}  {'step ms':>8}  {'x wall':>6}  {'x cpu':>6}  "
          f"{'update us':>9}  {'x wall':>6}  {'x cpu':>6}")
    print("-" * 100)
    for base_name, phase, s, sw, sc, u, uw, uc in rows:
        print(f"{base_name:<18}  {phase:<27}  {s:8.1f}  {sw:6.3f}  {sc:6.3f}  "
              f"{u:9.1f}  {uw:6.3f}  {uc:6.3f}")


def darts_like_graph(cells: int, seed: int = 0) -> SearchGraph:
    """A DARTS-like segment graph: each cell has 4 nodes, node i sums one removable op from
    each of its i + 2 inputs (plus, at random, a parameter-free skip), the cell output
    concatenates the nodes. About 14 groups per cell."""
    rng = np.random.default_rng(seed)
    g = nx.DiGraph()
    counter = iter(range(10**9))
    source = next(counter)
    g.add_node(source)
    groups = []
    prev2 = prev1 = source
    for _ in range(cells):
        states = [prev2, prev1]
        for _ in range(4):
            node = next(counter)
            for s in states:
                op = next(counter)
                g.add_edge(s, op)
                g.add_edge(op, node)
                groups.append(op)
                if rng.random() < 0.2:  # a skip connection: a parameter-free segment
                    skip = next(counter)
                    g.add_edge(s, skip)
                    g.add_edge(skip, node)
            states.append(node)
        out = next(counter)
        for s in states[2:]:
            g.add_edge(s, out)
        prev2, prev1 = prev1, out
    output = next(counter)
    g.add_edge(prev1, output)
    return SearchGraph.from_graph(g, [source], output, groups)


def darts8_graph() -> SearchGraph:
    model = models.create("darts_8cells")
    x = jax.ShapeDtypeStruct((1, *models.input_shape("darts_8cells")), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    space = ag.generate_search_space(model.apply, variables, x, train=False)
    return SearchGraph.from_space(space)


def search_table(repeats: int, darts: bool) -> None:
    graphs = {}
    if darts:
        graphs["DARTS-8 (zoo)"] = darts8_graph()
    graphs["DARTS-like, 36 cells"] = darts_like_graph(36)
    graphs["DARTS-like, 72 cells"] = darts_like_graph(72)
    print()
    print("hierarchical search, one call: in-graph (jitted, compiled beforehand) and on the host "
          "(host_hierarchical_search, what H2SPG's callback runs; same result checked)")
    print(f"{'graph':<22} {'groups':>6} {'|V_s|':>6} {'|E_s|':>6} {'sparsity':>8} "
          f"{'K':>5} {'jit median ms':>13} {'max ms':>7} {'host median ms':>14} {'max ms':>7}")
    for name, graph in graphs.items():
        search = jax.jit(hierarchical_search, static_argnums=0)
        for sparsity in (0.3, 0.7, 0.9):
            k = int(sparsity * graph.num_groups)
            times, host_times = [], []
            for seed in range(repeats * 3):
                sal = np.random.default_rng(seed).normal(size=graph.num_groups).astype(np.float32)
                want = jax.block_until_ready(search(graph, jnp.asarray(sal), k))  # compiles once
                t0 = time.perf_counter()
                jax.block_until_ready(search(graph, jnp.asarray(sal), k))
                times.append(time.perf_counter() - t0)
                order = np.asarray(search_order(jnp.asarray(sal)))
                t0 = time.perf_counter()
                got = host_hierarchical_search(graph, order, k)
                host_times.append(time.perf_counter() - t0)
                assert np.array_equal(got, np.asarray(want)), "host and in-graph searches differ"
            print(f"{name:<22} {graph.num_groups:>6} {graph.num_nodes:>6} "
                  f"{len(graph.edge_src):>6} {sparsity:>8} {k:>5} "
                  f"{statistics.median(times) * 1e3:>13.2f} {max(times) * 1e3:>7.2f} "
                  f"{statistics.median(host_times) * 1e3:>14.2f} {max(host_times) * 1e3:>7.2f}")


def _compile_seconds(fn, *args) -> tuple[float, float]:
    jax.clear_caches()  # or a later round would find the function compiled
    clocks = _Clocks()
    jax.jit(fn).lower(*args).compile()
    return clocks.per(1)


def _load() -> str:
    """The 1-minute load average and the number of CPUs (the machine may be shared)."""
    return f"{os.getloadavg()[0]:.1f}/{os.cpu_count()}"


def _floor_coefficients(stats: jax.Array) -> jax.Array:
    """``[G, 2]`` coefficients (of u, of x) that depend on every group statistic, as H2SPG's do."""
    xx, xu, uu = stats
    return jnp.stack([xu / (uu + 1.0), -xx / (xx + 1.0)], axis=1)


def two_pass_floor(space, base: optax.GradientTransformation) -> optax.GradientTransformation:
    """What any per-group hybrid step must compile on top of its base optimizer: the base
    update u, one pass of per-group statistics of (x, u) (H2SPG's reduction), then a second,
    per-leaf pass a_g u + c_g x with coefficients that depend on those statistics (H2SPG's
    placement, coefficients and group indices as buffers). No saliency, search, phases or
    non-finite handling: a lower bound on H2SPG's compile time, not an optimizer."""
    from asgssd_jax.optim.h2spg import _as_buffers, _group_stats, _layout

    def update(grads, state, params):
        layout = _layout(space, params, "floor")
        xs, treedef = jax.tree_util.tree_flatten(params)
        updates, state = base.update(grads, state, params)
        us = treedef.flatten_up_to(updates)
        stats, _ = _group_stats(layout, space.num_groups, xs, us, us)
        coef = _floor_coefficients(stats)
        coef, index = _as_buffers(jnp.asarray(True), (
            coef, {g: jnp.int32(g) for g in set(layout.leaf_groups) if g >= 0}))
        out = list(us)
        for i in layout.whole:
            c = jax.lax.dynamic_index_in_dim(coef, index[layout.leaf_groups[i]], 0, False)
            out[i] = c[0] * us[i] + c[1] * xs[i]
        return treedef.unflatten(out), state

    return optax.GradientTransformation(base.init, update)


def flat_floor(space, base: optax.GradientTransformation, row: int = 512
               ) -> optax.GradientTransformation:
    """The same two passes as :func:`two_pass_floor` over one flat buffer instead of leaf by
    leaf: the grouped leaves, each padded to whole rows of ``row`` entries, concatenated into
    ``[rows, row]`` arrays (so that each row belongs to one leaf, hence one group), reduced per
    row and summed per group, placed with per-row coefficients, then sliced back into leaves.
    Shape-independent kernels at the price of the copies in and out: the alternative layout
    to per-leaf kernels, measured against it, not an optimizer."""
    from asgssd_jax.optim.h2spg import _layout

    def update(grads, state, params):
        layout = _layout(space, params, "flat floor")
        xs, treedef = jax.tree_util.tree_flatten(params)
        updates, state = base.update(grads, state, params)
        us = treedef.flatten_up_to(updates)
        rows = [-(-xs[i].size // row) for i in layout.whole]

        def flat(leaves):
            return jnp.concatenate([
                jnp.pad(leaves[i].reshape(-1), (0, r * row - leaves[i].size)).reshape(r, row)
                for i, r in zip(layout.whole, rows)])
        x, u = flat(xs), flat(us)
        owner = np.repeat(np.array([layout.leaf_groups[i] for i in layout.whole]), rows)
        per = jnp.stack([jnp.sum(x * x, 1), jnp.sum(x * u, 1), jnp.sum(u * u, 1)])
        stats = jax.vmap(lambda v: jax.ops.segment_sum(v, owner, space.num_groups))(per)
        coef = _floor_coefficients(stats)[owner]  # [rows, 2]
        placed = coef[:, :1] * u + coef[:, 1:] * x
        out, start = list(us), 0
        for i, r in zip(layout.whole, rows):
            out[i] = placed[start:start + r].reshape(-1)[:xs[i].size].reshape(xs[i].shape)
            start += r
        return treedef.unflatten(out), state

    return optax.GradientTransformation(base.init, update)


def compile_table(names: list[str], batch: int, rounds: int, floor: bool = False) -> None:
    print()
    print(f"compile time, jit(...).lower(...).compile(), batch {batch}; minimum over {rounds} "
          "interleaved round(s); ratio to the base by wall and by CPU time; load: the 1-minute "
          "load average / CPUs when the row was measured")
    print(f"{'model':<14} {'groups':>6} {'leaves':>6}  {'what':<22} {'base s':>7} "
          f"{'H2SPG s':>8} {'x wall':>6} {'x cpu':>6} {'load':>7}")
    for name in names:
        model = models.create(name)
        x = jnp.zeros((batch, *models.input_shape(name)), jnp.float32)
        y = jnp.zeros((batch,), jnp.int32)
        variables = jax.jit(model.init)(jax.random.key(0), x[:1])
        space = ag.generate_search_space(model.apply, variables, x[:1], train=False)
        params = variables["params"]
        rest = {k: v for k, v in variables.items() if k != "params"}

        def step_of(tx):
            def loss_fn(p, rest):
                out, new = model.apply({"params": p, **rest}, x, train=True, mutable=list(rest))
                return optax.softmax_cross_entropy_with_integer_labels(out, y).mean(), new

            def step(p, rest, s):
                (_, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, rest)
                updates, s = tx.update(grads, s, p)
                return optax.apply_updates(p, updates), rest, s
            return step

        txs = {"base": optax.sgd(0.05, momentum=0.9),
               "h2spg": ag.h2spg(space, 0.05, 0.5, warmup_steps=10, projection_steps=10,
                                 base=optax.sgd(0.05, momentum=0.9))}
        if floor:
            txs["two passes"] = two_pass_floor(space, optax.sgd(0.05, momentum=0.9))
            txs["flat"] = flat_floor(space, optax.sgd(0.05, momentum=0.9))
        times = {(k, w): [] for k in txs for w in ("train step", "update")}
        for _ in range(rounds):
            for k, tx in txs.items():
                state = jax.eval_shape(tx.init, params)
                times[k, "train step"].append(_compile_seconds(step_of(tx), params, rest, state))
                times[k, "update"].append(_compile_seconds(tx.update, params, state, params))
        for what in ("train step", "update"):
            for k in [k for k in txs if k != "base"]:
                b, h = _best(times["base", what]), _best(times[k, what])
                label = what if k == "h2spg" else f"{what}, {k}"
                print(f"{name:<14} {space.num_groups:>6} "
                      f"{len(jax.tree_util.tree_leaves(params)):>6}  {label:<22} {b[0]:7.2f} "
                      f"{h[0]:8.2f} {h[0] / b[0]:6.2f} {h[1] / b[1]:6.2f} {_load():>7}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-darts", action="store_true", help="skip DARTS-8's search space")
    parser.add_argument("--compile", nargs="+", default=["resnet18", "super_resnet",
                                                         "darts_8cells"],
                        help="zoo models of the compile-time table ('none': skip it)")
    parser.add_argument("--compile-batch", type=int, default=2)
    parser.add_argument("--compile-rounds", type=int, default=1)
    parser.add_argument("--only-compile", action="store_true",
                        help="only the compile-time table")
    parser.add_argument("--floor", action="store_true",
                        help="also compile two_pass_floor, the part of any per-group hybrid "
                             "step that cannot fuse into the base optimizer's kernels, and "
                             "flat_floor, the same over one flat buffer")
    args = parser.parse_args()
    if not args.only_compile:
        optimizer_table(args.repeats)
        search_table(args.repeats, not args.no_darts)
    if args.compile != ["none"]:
        compile_table(args.compile, args.compile_batch, args.compile_rounds, args.floor)


if __name__ == "__main__":
    main()
