"""Compile cost of sub-networks of scanned layer stacks.

    python benchmarks/scan_compile.py [--depths 4 8 16] [--dim 128] [--batch 8] [--length 64]

A ``scan`` over a stack of layers is analysed (and its sub-network runs) unrolled, one
iteration after the other; the removed layers' slices leave the stacked leaves. This prints,
for the zoo's ``decoder_lm`` with ``scan_layers=True`` at several depths, the time to compile
the jitted forward pass (``jax.jit(...).lower(...).compile()``) of the scanned full network, of
the same network unrolled (``scan_layers=False``), and of the sub-network of the scanned one
with half of its blocks removed (a valid set drawn at random), with the run time of each at
``--batch``. The sub-network's compile time grows with depth as the unrolled network's does;
the scanned network's stays about flat.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import asgssd_zoo as zoo
import jax

import asgssd_jax as ag


def _compile_seconds(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - start, compiled


def _run_ms(compiled, *args, repeats: int = 5) -> float:
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(depth: int, dim: int, batch: int, length: int, seed: int) -> dict:
    cfg = {"depth": depth, "dim": dim, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 3 * dim}
    tokens = jax.random.randint(jax.random.key(seed), (batch, length), 0, 128)
    row: dict = {"depth": depth}
    scanned = zoo.create("decoder_lm", scan_layers=True, **cfg)
    unrolled = zoo.create("decoder_lm", scan_layers=False, **cfg)
    v = jax.jit(scanned.init, static_argnames="train")(jax.random.key(seed), tokens[:1],
                                                       train=False)
    vu = jax.jit(unrolled.init, static_argnames="train")(jax.random.key(seed), tokens[:1],
                                                         train=False)
    space = ag.generate_search_space(scanned.apply, v, tokens[:1], train=False)
    rnd = random.Random(seed)
    order = list(range(space.num_groups))
    rnd.shuffle(order)
    chosen: list[int] = []
    for g in order:
        if len(chosen) < space.num_groups // 2 and space.is_valid(chosen + [g]):
            chosen.append(g)
    z = space.zero_groups(v, chosen)
    sub = ag.construct_subnetwork(space, z)
    row["removed"] = f"{len(chosen)}/{space.num_groups}"
    for name, fn, variables in (
            ("scanned", lambda w, t: scanned.apply(w, t, train=False), z),
            ("unrolled", lambda w, t: unrolled.apply(w, t, train=False), vu),
            ("sub", lambda w, t: sub.apply(w, t, train=False), sub.variables)):
        seconds, compiled = _compile_seconds(fn, variables, tokens)
        row[f"{name} compile"] = seconds
        row[f"{name} run"] = _run_ms(compiled, variables, tokens)
    diff = ag.relative_difference(scanned.apply(z, tokens, train=False),
                                  sub.apply(sub.variables, tokens, train=False))
    row["sub vs zeroed"] = diff
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="*", default=[4, 8, 16])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cols = ["depth", "removed", "scanned compile", "unrolled compile", "sub compile",
            "scanned run", "unrolled run", "sub run", "sub vs zeroed"]
    print(f"decoder_lm dim={args.dim}, batch {args.batch} x {args.length} tokens; compile in s, "
          f"run in ms (median of 5), on {jax.devices()[0].platform}")
    print("  ".join(f"{c:>16}" for c in cols))
    for depth in args.depths:
        row = measure(depth, args.dim, args.batch, args.length, args.seed)
        cells = []
        for c in cols:
            val = row[c]
            if isinstance(val, float):
                cells.append(f"{val:>16.2e}" if c == "sub vs zeroed" else f"{val:>16.2f}")
            else:
                cells.append(f"{val!s:>16}")
        print("  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
