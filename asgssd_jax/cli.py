"""The ``asgssd`` command."""

from __future__ import annotations

import argparse
import dataclasses
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


def _run_cmd(args: argparse.Namespace) -> int:
    from asgssd_jax.pipeline import RunConfig, run

    fields = {f.name for f in dataclasses.fields(RunConfig)}
    kwargs = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    kwargs["overrides"] = _parse_overrides(args.set or [])
    if args.out is None:
        kwargs["out"] = f"runs/{args.model}-{args.dataset}"
    run(RunConfig(**kwargs), progress=sys.stderr.isatty() and not args.quiet)
    return 0


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _add_run_parser(sub) -> None:
    from asgssd_jax.pipeline import RunConfig

    d = RunConfig()
    p = sub.add_parser(
        "run", help="search space -> H2SPG training -> sub-network (Algorithm 1)",
        description="Trains a zoo network once with H2SPG, builds the sub-network of the zero "
        "groups and writes report.json, report.md, pictures, plots, checkpoint and export into "
        "--out. The defaults finish in a few minutes on a laptop CPU on scikit-learn's digits.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=d.model, help="zoo model (see `asgssd models`)")
    p.add_argument("--dataset", default=d.dataset, help="digits, synthetic, or a TFDS name "
                   "(fashion_mnist, cifar10, svhn_cropped, stl10, imagenet2012)")
    p.add_argument("--data-dir", dest="data_dir", help="local TFDS data directory (offline)")
    p.add_argument("--target-sparsity", dest="target_sparsity", type=float,
                   default=d.target_sparsity,
                   help="fraction of the removal structures to remove, in [0, 1)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="training epochs in total")
    p.add_argument("--warmup-epochs", dest="warmup_epochs", type=int, default=d.warmup_epochs,
                   help="epochs of warm-up before the hierarchical search")
    p.add_argument("--projection-epochs", dest="projection_epochs", type=int,
                   default=d.projection_epochs,
                   help="epochs over which the redundant groups are projected onto zero")
    p.add_argument("--finetune-epochs", dest="finetune_epochs", type=int,
                   default=d.finetune_epochs, help="optional fine-tuning of the sub-network")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=d.batch_size,
                   help="global batch size (split over all devices)")
    p.add_argument("--lr", dest="learning_rate", type=float, default=d.learning_rate,
                   help="initial learning rate")
    p.add_argument("--lr-warmup-epochs", dest="lr_warmup_epochs", type=int,
                   default=d.lr_warmup_epochs,
                   help="epochs of linear learning-rate ramp before the schedule (0: none)")
    p.add_argument("--schedule", default=d.schedule,
                   choices=["cosine", "multi_cosine", "constant"], help="learning-rate schedule")
    p.add_argument("--periods", type=int, default=d.periods,
                   help="cosine periods for --schedule multi_cosine")
    p.add_argument("--optimizer", default=d.optimizer, choices=["h2spg", "dhspg", "proxsg_plus"],
                   help="H2SPG, or a baseline of the paper's ablation (Table 4)")
    p.add_argument("--group-lasso", dest="group_lasso", type=float, default=d.group_lasso,
                   help="group-lasso coefficient pushing the redundant groups towards zero "
                   "(default: the optimizer's own; H2SPG's fades each group out over the "
                   "projection phase)")
    p.add_argument("--base", default=d.base, choices=["sgd", "adam", "adamw"],
                   help="base optimizer for the important groups")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    p.add_argument("--weight-decay", dest="weight_decay", type=float, default=d.weight_decay,
                   help="weight decay")
    p.add_argument("--mixup", type=float, default=d.mixup, help="MixUp alpha (0: off)")
    p.add_argument("--train-size", dest="train_size", type=int,
                   help="use only this many training examples")
    p.add_argument("--test-size", dest="test_size", type=int,
                   help="use only this many test examples")
    p.add_argument("--baseline", action="store_true",
                   help="also train the full network with the base optimizer, for comparison")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override a model field, e.g. --set width=2 (repeatable)")
    p.add_argument("--out", help="run directory (default: runs/MODEL-DATASET)")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run from its last checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_cmd)


def _report_cmd(args: argparse.Namespace) -> int:
    from asgssd_jax import report as report_lib

    run_dir = Path(args.run_dir)
    path = run_dir / "report.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass the --out directory of an "
                                "`asgssd run`")
    report = json.loads(path.read_text())
    files = report_lib.plot_history(report, run_dir) + [report_lib.write_markdown(report, run_dir)]
    print(Path(files[-1]).read_text())
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def _models_cmd(args: argparse.Namespace) -> int:
    import models

    for name in models.names():
        s = models.spec(name)
        print(f"{name:<16} {'x'.join(map(str, s.input_shape)):<10} {s.dataset}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="asgssd",
        description="Automated search-space generation and sub-network search for JAX/Flax.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(sub)
    sub.add_parser("models", help="list the zoo's networks").set_defaults(func=_models_cmd)
    p = sub.add_parser("report", help="print a run's report and redraw its plots")
    p.add_argument("run_dir", help="the --out directory of an `asgssd run`")
    p.set_defaults(func=_report_cmd)
    p = sub.add_parser("space", help="print and draw the search space of a zoo model")
    p.add_argument("--model", default="demonet", help="zoo model name (default: demonet)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the traced sample")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed")
    p.add_argument("--out", default="runs/space", help="directory for pictures and JSON "
                   "(default: runs/space; '' to skip)")
    p.set_defaults(func=_space_cmd)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:  # a user's mistake: the message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    from asgssd_jax.data import DatasetUnavailableError
    from asgssd_jax.trace import TraceError

    return (ValueError, KeyError, DatasetUnavailableError, TraceError, FileNotFoundError)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
