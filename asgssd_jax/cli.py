"""The ``asgssd`` command."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _space_cmd(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    import models
    from asgssd_jax import count_macs, count_params, generate_search_space, viz

    try:
        model = models.create(args.model)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    x = jnp.zeros((args.batch, *models.input_shape(args.model)), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(args.seed), x)
    t0 = time.perf_counter()
    space = generate_search_space(model.apply, variables, x, train=False)
    seconds = time.perf_counter() - t0
    print(f"{args.model}: {count_params(variables):,} params, "
          f"{count_macs(model.apply, variables, x, train=False) / 1e6:.1f}M MACs per example; "
          f"search space generated in {seconds:.3f} s")
    print(space.summary())
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        files = [
            viz.save(viz.draw_trace_graph(space, title=f"{args.model}: trace graph"),
                     out / "trace_graph.svg"),
            viz.save(viz.draw_segment_graph(space, title=f"{args.model}: segment graph"),
                     out / "segment_graph.svg"),
        ]
        report = {
            "model": args.model,
            "params": count_params(variables),
            "num_groups": space.num_groups,
            "generation_seconds": seconds,
            "groups": [{"index": g.index, "params": g.num_params, "macs": g.macs,
                        "param_paths": list(g.param_paths)} for g in space.groups],
        }
        (out / "search_space.json").write_text(json.dumps(report, indent=2))
        files.append(out / "search_space.json")
        print("wrote " + ", ".join(str(f) for f in files))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="asgssd",
        description="Automated search-space generation and sub-network search for JAX/Flax.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("space", help="print and draw the search space of a zoo model")
    p.add_argument("--model", default="demonet", help="zoo model name (default: demonet)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the traced sample")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed")
    p.add_argument("--out", default="runs/space", help="directory for pictures and JSON "
                   "(default: runs/space; '' to skip)")
    p.set_defaults(func=_space_cmd)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
