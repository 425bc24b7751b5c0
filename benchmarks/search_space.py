"""Search-space generation time and graph sizes (jaxpr tracing included).

    python benchmarks/search_space.py [--models demonet resnet18 ...] [--repeats 3]

Variables are abstract (``jax.eval_shape`` of ``init``): generation only needs shapes, so no
weights are in memory. Each row is the median of ``--repeats`` runs after one warm-up call;
"RSS +MB" is how much the process's peak resident memory grew during the row (0 when an earlier
row already reached more). The two "decoder_lm 1.2B" rows are a Llama-style transformer of
1.22 billion parameters (24 layers, width 2048, grouped-query attention, SwiGLU MLP 5632, 32,000
tokens, 128 positions), unrolled and with ``nn.scan`` over its layers (the scan is unrolled
into its iterations for the analysis, each layer's attention and MLP a group of slices of the
stacked leaves: the same 48 groups); "decoder_lm 0.6B" is the same with 12 layers. Goals for the unrolled one: under 10 s, memory independent of the parameter
count, time linear in depth (printed: 24 layers / 12 layers). Goals on a 2-core CPU (the PyTorch
peers: OTO's graph build 0.125 s for ResNet-18 and 2.49 s for DenseNet-121 at 224x224;
Torch-Pruning's dependency graph 0.03 s and 4.5 s, as quoted when these goals were set):
ResNet-18 under 0.125 s, DenseNet-121 under 0.5 s, and time linear in size (16 DARTS cells / 8
cells within 1.6-2.4x). Measured side by side on this CPU, Torch-Pruning 1.6.1 builds its graph
in 0.016 s and 0.08 s (DenseNet-121: 0.26 s with its groups listed); see benchmarks/peers.py.
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import time

import jax
import jax.numpy as jnp

import asgssd_jax as ag
import asgssd_zoo as models

# name -> (zoo model, overrides, input shape or None for the zoo's)
CASES = {
    "demonet": ("demonet", {}, None),
    "resnet18 (CIFAR stem)": ("resnet18", {}, None),
    "densenet121 (224x224)": ("densenet121", {}, None),
    "darts, 8 cells": ("darts_8cells", {"layers": 8}, None),
    "darts, 16 cells": ("darts_8cells", {"layers": 16}, None),
}
# every other zoo network, at its dataset's input size
for _name in models.names():
    if _name not in ("demonet", "resnet18", "densenet121", "darts_8cells"):
        CASES[_name] = (_name, {}, None)
_LLM_1B = {"num_classes": 32_000, "dim": 2048, "depth": 24, "num_heads": 16, "num_kv_heads": 4,
           "mlp_dim": 5632}
CASES["decoder_lm 0.6B"] = ("decoder_lm", {**_LLM_1B, "depth": 12}, None)
CASES["decoder_lm 1.2B"] = ("decoder_lm", _LLM_1B, None)
CASES["decoder_lm 1.2B, scan"] = ("decoder_lm", {**_LLM_1B, "scan_layers": True}, None)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(model_name, overrides, shape, repeats):
    model = models.create(model_name, **overrides)
    shape = shape or models.input_shape(model_name)
    x = jax.ShapeDtypeStruct((1, *shape), models.input_dtype(model_name))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    rss = _peak_rss_mb()
    space = ag.generate_search_space(model.apply, variables, x, train=False)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        space = ag.generate_search_space(model.apply, variables, x, train=False)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    ag.trace_program(model.apply, variables, x, train=False)
    trace_only = time.perf_counter() - t0
    t = space.trace
    return {
        "seconds": statistics.median(times),
        "rss_mb": _peak_rss_mb() - rss,
        "params": sum(math.prod(v.shape) for v in jax.tree_util.tree_leaves(variables)),
        "jaxpr": trace_only,
        "ops": len(t.program.ops),
        "V": t.graph.number_of_nodes(),
        "E": t.graph.number_of_edges(),
        "V_s": space.segment_graph.graph.number_of_nodes(),
        "groups": space.num_groups,
    }


def _short(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES),
                        metavar="CASE", help=f"rows to run (default all: {', '.join(CASES)})")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = {}
    header = (f"{'network':<24}{'params':>9}{'time (s)':>10}{'of it jaxpr':>13}{'RSS +MB':>9}"
              f"{'ops':>8}{'|V|':>7}{'|E|':>7}{'|V_s|':>7}{'groups':>8}")
    print(header)
    print("-" * len(header))
    for name in args.cases:
        r = measure(*CASES[name], args.repeats)
        rows[name] = r
        print(f"{name:<24}{_short(r['params']):>9}{r['seconds']:>10.3f}{r['jaxpr']:>13.3f}"
              f"{r['rss_mb']:>9.0f}{r['ops']:>8}{r['V']:>7}{r['E']:>7}{r['V_s']:>7}"
              f"{r['groups']:>8}", flush=True)
    if "decoder_lm 0.6B" in rows and "decoder_lm 1.2B" in rows:
        ratio = rows["decoder_lm 1.2B"]["seconds"] / rows["decoder_lm 0.6B"]["seconds"]
        print(f"\ndecoder_lm 24 layers / 12 layers: {ratio:.2f}x (goal about 2x: linear in depth)")
    if "darts, 8 cells" in rows and "darts, 16 cells" in rows:
        ratio = rows["darts, 16 cells"]["seconds"] / rows["darts, 8 cells"]["seconds"]
        print(f"\nDARTS 16 cells / 8 cells: {ratio:.2f}x (goal 1.6-2.4x: linear in size)")


if __name__ == "__main__":
    main()
