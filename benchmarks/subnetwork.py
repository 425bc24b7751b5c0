"""Sub-network construction: full vs sub-network params, MACs and inference latency.

    python benchmarks/subnetwork.py [--models demonet resnet18 ...] [--batch 64] [--repeats 5]
                                    [--fraction 0.5] [--seed 0]

For each zoo network (``models.names()``), a random valid set of about ``--fraction`` of the
search space's groups is zeroed (groups visited in random order, each added while the set
stays valid, as H2SPG's search does), the sub-network is constructed, and both networks are
timed with ``jax.jit`` in inference mode at ``--batch`` (median of ``--repeats`` runs after
a warm-up). Goal (CPU): latency ratio at least 0.8x the MAC ratio; construction well under a
second for DemoNet.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import asgssd_jax as ag
import asgssd_zoo as models
from asgssd_jax.trace import leaf_path


def zero_set(space: ag.SearchSpace, fraction: float, seed: int) -> list[int]:
    rnd = random.Random(seed)
    order = list(range(space.num_groups))
    rnd.shuffle(order)
    target = round(fraction * space.num_groups)
    chosen: list[int] = []
    for g in order:
        if len(chosen) < target and space.is_valid(chosen + [g]):
            chosen.append(g)
    return sorted(chosen)


def random_variables(model, x, seed: int):
    """Random variables of ``model``'s shapes drawn with numpy (compiling ``init`` of the big
    zoo networks takes minutes on a CPU; the values do not change the timings)."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = leaf_path(path).split("/")
        if name[-1] == "var":
            return jnp.ones(s.shape, s.dtype)
        if name[-1] in ("scale", "bias", "mean"):
            return jnp.asarray(float(name[-1] == "scale") + 0.1 * rng.normal(size=s.shape),
                               s.dtype)
        fan_in = max(1, math.prod(s.shape[:-1]))
        return jnp.asarray(rng.normal(size=s.shape) / math.sqrt(fan_in), s.dtype)

    spec = jax.eval_shape(model.init, jax.random.key(seed), x)
    return jax.tree_util.tree_map_with_path(fill, spec)


def latency(fn, variables, x, repeats: int) -> float:
    jax.block_until_ready(fn(variables, x))  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(variables, x))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(name: str, batch: int, repeats: int, fraction: float, seed: int) -> dict:
    model = models.create(name)
    shape = models.input_shape(name)
    x1 = jnp.ones((1, *shape), jnp.float32)
    variables = random_variables(model, x1, seed)
    space = ag.generate_search_space(model.apply, variables, x1, train=False)
    zero = zero_set(space, fraction, seed)
    zeroed = space.zero_groups(variables, zero)
    ag.construct_subnetwork(space, zeroed)  # warm-up (first-use compiles of constant folding)
    t0 = time.perf_counter()
    sub = ag.construct_subnetwork(space, zeroed)
    construct = time.perf_counter() - t0
    x = jax.random.normal(jax.random.key(1), (batch, *shape), jnp.float32)
    full_fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
    sub_fn = jax.jit(sub.apply)
    err = ag.relative_difference(full_fn(zeroed, x), sub_fn(sub.variables, x))
    row = {
        "groups": f"{len(zero)}/{space.num_groups}",
        "params": (ag.count_params(variables), ag.count_params(sub)),
        "macs": (ag.count_macs(model.apply, variables, x1, train=False),
                 ag.count_macs(sub.apply, sub.variables, x1)),
        "latency": (latency(full_fn, zeroed, x, repeats), latency(sub_fn, sub.variables, x,
                                                                  repeats)),
        "construct": construct,
        "error": err,
    }
    row["mac_ratio"] = row["macs"][0] / max(row["macs"][1], 1)
    row["latency_ratio"] = row["latency"][0] / row["latency"][1]
    return row


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=models.names())
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, batch {args.batch}, median of "
          f"{args.repeats}, zeroing ~{args.fraction:.0%} of the groups")
    header = (f"{'network':<16}{'groups':>8}{'params full':>13}{'sub':>9}{'MACs full':>11}"
              f"{'sub':>9}{'ms full':>10}{'sub':>9}{'MAC x':>8}{'latency x':>11}{'lat/MAC':>9}"
              f"{'build s':>9}{'rel err':>9}")
    print(header)
    print("-" * len(header))
    for name in args.models:
        r = measure(name, args.batch, args.repeats, args.fraction, args.seed)
        (pf, ps), (mf, ms), (lf, ls) = r["params"], r["macs"], r["latency"]
        print(f"{name:<16}{r['groups']:>8}{_human(pf):>13}{_human(ps):>9}{_human(mf):>11}"
              f"{_human(ms):>9}{lf * 1e3:>10.1f}{ls * 1e3:>9.1f}{r['mac_ratio']:>8.2f}"
              f"{r['latency_ratio']:>11.2f}{r['latency_ratio'] / r['mac_ratio']:>9.2f}"
              f"{r['construct']:>9.3f}{r['error']:>9.1e}", flush=True)
    print("\nMAC x = full/sub MACs, latency x = full/sub latency; goal: lat/MAC >= 0.8")


if __name__ == "__main__":
    main()
