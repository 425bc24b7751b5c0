"""The ``asgssd`` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path


def _space_cmd(args: argparse.Namespace) -> int:
    import jax

    import asgssd_zoo as models
    from asgssd_jax import count_macs, count_params, generate_search_space, viz

    try:
        model = models.create(args.model)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    x = _zoo_sample(args.model, args.batch)
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
    kwargs = {k: v for k, v in vars(args).items() if k in fields}  # only the flags given
    kwargs["overrides"] = _parse_overrides(getattr(args, "set", None) or [])
    cfg = RunConfig(**kwargs)  # the flags not given take the defaults of the run's task
    run(cfg, progress=not args.quiet, progress_seconds=args.log_every)
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

    p = sub.add_parser(
        "run", help="search space -> H2SPG training -> sub-network (Algorithm 1)",
        description="Trains a zoo network once with H2SPG, builds the sub-network of the zero "
        "groups and writes report.json, report.md, pictures, plots, checkpoint and export into "
        "--out. The defaults finish in a few minutes on a laptop CPU on scikit-learn's digits. "
        "Language modelling: `asgssd run --model decoder_lm` trains the zoo's small decoder "
        "(4 layers, width 128: 8 attention and MLP blocks as removal structures) to predict "
        "the next character of the Python standard library's own source (--dataset "
        "python_source, no download), 6 epochs of 50 steps (300 steps, a few minutes on a CPU) "
        "with AdamW under H2SPG, removing K = int(0.25 x 8) = 2 blocks, and reports the "
        "validation loss (nats/char) and perplexity instead of the accuracy. Defaults marked "
        "'language modelling' below are those of such a run.",
        argument_default=argparse.SUPPRESS)
    p.add_argument("--model", help="zoo model (see `asgssd models`)")
    p.add_argument("--dataset", help="digits, synthetic, or a TFDS name "
                   "(fashion_mnist, cifar10, svhn_cropped, stl10, imagenet2012) for the image "
                   "models; python_source (the Python standard library's source as characters) "
                   "for decoder_lm")
    p.add_argument("--data-dir", dest="data_dir", help="local TFDS data directory (offline)")
    p.add_argument("--target-sparsity", dest="target_sparsity", type=float,
                   help="fraction of the removal structures to remove, in [0, 1)")
    p.add_argument("--epochs", type=int, help="training epochs in total")
    p.add_argument("--warmup-epochs", dest="warmup_epochs", type=int,
                   help="epochs of warm-up before the hierarchical search")
    p.add_argument("--projection-epochs", dest="projection_epochs", type=int,
                   help="epochs over which the redundant groups are projected onto zero")
    p.add_argument("--finetune-epochs", dest="finetune_epochs", type=int,
                   help="epochs of fine-tuning of the sub-network (0: none)")
    p.add_argument("--steps-per-epoch", dest="steps_per_epoch", type=int,
                   help="training steps between two evaluations (default: one pass over the "
                   "training images; language modelling: 50)")
    p.add_argument("--context-length", dest="context_length", type=int,
                   help="language modelling: characters per training window (default: the "
                   "model's, 128 for decoder_lm)")
    p.add_argument("--batch-size", dest="batch_size", type=int,
                   help="global batch size (split over all devices)")
    p.add_argument("--lr", dest="learning_rate", type=float,
                   help="initial learning rate")
    p.add_argument("--lr-warmup-epochs", dest="lr_warmup_epochs", type=int,
                   help="epochs of linear learning-rate ramp before the schedule (0: none)")
    p.add_argument("--schedule",
                   choices=["cosine", "multi_cosine", "step", "constant"],
                   help="learning-rate schedule")
    p.add_argument("--periods", type=int,
                   help="cosine periods for --schedule multi_cosine")
    p.add_argument("--step-epochs", dest="step_epochs", type=int,
                   help="for --schedule step: the learning rate falls x0.1 every this many "
                   "epochs")
    p.add_argument("--search-lr", dest="search_learning_rate", type=float,
                   help="constant learning rate of the hierarchical search phase (the warm-up "
                   "epochs); the schedule then starts afresh from --lr (default: one schedule "
                   "for the whole run)")
    p.add_argument("--optimizer", choices=["h2spg", "dhspg", "proxsg_plus"],
                   help="H2SPG, or a baseline of the paper's ablation (Table 4)")
    p.add_argument("--group-lasso", dest="group_lasso", type=float,
                   help="group-lasso coefficient pushing the redundant groups towards zero "
                   "(default: the optimizer's own; H2SPG's is set per group at the search so "
                   "that the half-space test zeroes it during the projection phase)")
    p.add_argument("--fade-out", dest="fade_out", action="store_true",
                   help="shrink each redundant group by 1/r of its norm per step (r: the "
                   "projection steps left; OTO's HESSO behaviour) instead of the paper's "
                   "half-space projection")
    p.add_argument("--base", choices=["sgd", "adam", "adamw"],
                   help="base optimizer for the important groups")
    p.add_argument("--momentum", type=float, help="SGD momentum")
    p.add_argument("--weight-decay", dest="weight_decay", type=float,
                   help="weight decay")
    p.add_argument("--mixup", type=float, help="MixUp alpha (0: off)")
    p.add_argument("--train-size", dest="train_size", type=int,
                   help="use only this many training examples (images, or windows of text)")
    p.add_argument("--test-size", dest="test_size", type=int,
                   help="use only this many test examples (images, or windows of text)")
    p.add_argument("--baseline", action="store_true",
                   help="also train the full network with the base optimizer, for comparison")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override a model field, e.g. --set width=2 (repeatable)")
    p.add_argument("--out", help="run directory (default: runs/MODEL-DATASET)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (a killed one) from its last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (without it, a directory that holds a run is "
                   "refused)")
    p.add_argument("--log-every", dest="log_every", type=float, default=30.0, metavar="SECONDS",
                   help="when the output is not a terminal, a progress line this often "
                   "(default: 30)")
    p.add_argument("--quiet", action="store_true", default=False,
                   help="no progress bar or progress lines")
    _add_defaults_to_help(p, RunConfig())
    p.set_defaults(func=_run_cmd)


def _add_defaults_to_help(parser: argparse.ArgumentParser, defaults) -> None:
    """`` (default: X)`` after each option's help, X from ``defaults`` (the RunConfig), where
    the help does not say its default itself; ``; language modelling: Y`` where another task's
    default differs."""
    from asgssd_jax import tasks

    for action in parser._actions:
        value = getattr(defaults, action.dest, None)
        if action.help and "default" not in action.help and value is not None \
                and value is not False:
            others = "".join(f"; {t.name.replace('_', ' ')}: {t.defaults[action.dest]}"
                             for t in tasks.TASKS if t.defaults.get(action.dest, value) != value)
            action.help += f" (default: {value}{others})"


def _report_cmd(args: argparse.Namespace) -> int:
    from asgssd_jax import report as report_lib

    run_dir = Path(args.run_dir)
    path = run_dir / "report.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass the --out directory of an "
                                "`asgssd run`")
    report = json.loads(path.read_text())
    files = report_lib.redraw(report, run_dir)
    print(Path(files[-1]).read_text())
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def _models_cmd(args: argparse.Namespace) -> int:
    import asgssd_zoo as models
    from asgssd_jax import tasks

    print(f"{'model':<16} {'input':<10} {'dataset':<14} task of `asgssd run --model NAME` "
          "(its default --dataset)")
    for name in models.names():
        s = models.spec(name)
        task = tasks.default_task(name, None)
        print(f"{name:<16} {'x'.join(map(str, s.input_shape)):<10} {s.dataset:<14} "
              f"{task.description} ({task.defaults['dataset']})")
    print(f"Pairs of --model and --dataset that work: {tasks.pairs()}.")
    return 0


def _zoo_sample(name: str, batch: int = 1):
    """A zero input of the zoo model ``name``: images (float32) or token ids (int32)."""
    import jax.numpy as jnp

    import asgssd_zoo as models

    return jnp.zeros((batch, *models.input_shape(name)), models.input_dtype(name))


def _random_input(rng, shape: tuple[int, ...], dtype, vocab_size: int):
    """A random input of ``shape``: standard normal, or token ids below ``vocab_size``."""
    import numpy as np

    if np.issubdtype(np.dtype(dtype), np.integer):
        return rng.integers(0, vocab_size, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


# -- asgssd construct / asgssd export ------------------------------------------------------------
def _construct_cmd(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import asgssd_zoo as models
    from asgssd_jax import (
        construct_subnetwork,
        count_macs,
        count_params,
        generate_search_space,
        relative_difference,
        save_subnetwork,
    )
    from asgssd_jax import report as report_lib

    overrides = _parse_overrides(args.set or [])
    if args.run_dir is not None:
        if args.zero_groups is not None:
            raise ValueError("--zero-groups is for a zoo model at random initialisation "
                             "(`asgssd construct --model NAME --zero-groups 0,2`); a run's zero "
                             "groups are read from its checkpoint")
        run_dir = Path(args.run_dir)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"{run_dir} is not a directory: pass the --out directory of "
                                    "an `asgssd run`")
        ckpt_dir, step = _latest_h2spg_checkpoint(run_dir)
        name, overrides, num_classes = _run_model(run_dir, args.model, overrides)
        variables = _restore_trained(ckpt_dir, step)
        if num_classes is None:  # runs of older versions recorded no num_classes
            num_classes = _infer_num_classes(name, overrides, _shapes(variables))
        model = _create_model(name, overrides, num_classes)
        sample = _zoo_sample(name)
        _check_variables_match(model, variables, sample, name, overrides)
        print(f"restored the H2SPG-trained variables of {name} from {run_dir}/checkpoints/h2spg "
              f"(step {step})")
        out = Path(args.out) if args.out else run_dir / "construct"
        source = {"run_dir": run_dir, "checkpoint_step": step}
    else:
        if args.model is None or args.zero_groups is None:
            raise ValueError("pass RUN_DIR (the --out directory of an `asgssd run`), or "
                             "--model NAME --zero-groups I,J,... for a zoo model at random "
                             "initialisation")
        name = args.model
        _zoo_spec(name)
        _parse_group_indices(args.zero_groups, None, name)  # the syntax, before any work
        num_classes = None
        model = _create_model(name, overrides, num_classes)
        sample = _zoo_sample(name)
        # the groups and which sets are valid depend on the program only: check the request on
        # zeros before paying for the initialisation
        shapes = jax.eval_shape(model.init, jax.random.key(args.seed), sample)
        probe = generate_search_space(
            model.apply, jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes),
            sample, train=False)
        requested = _parse_group_indices(args.zero_groups, probe.num_groups, name)
        _check_valid(probe, requested, name, from_run=False)
        variables = jax.jit(model.init)(jax.random.key(args.seed), sample)
        print(f"initialised {name} with seed {args.seed}")
        out = Path(args.out) if args.out else Path("runs") / f"construct-{name}"
        source = {"seed": args.seed}

    space = generate_search_space(model.apply, variables, sample, train=False)
    print(f"search space: {space.num_groups} removal structures")
    if args.run_dir is None:
        variables = space.zero_groups(variables, requested)
    zero = space.zero_group_indices(variables)
    if not zero:
        raise ValueError(
            f"no group of {name} is exactly zero yet at step {source.get('checkpoint_step')}: "
            "H2SPG zeroes the redundant groups during its projection phase (after "
            "--warmup-epochs); continue the run with `asgssd run --resume --out "
            f"{args.run_dir}` (and its other flags) and construct again")
    print(f"zero groups: {zero}")
    _check_valid(space, zero, name, from_run=args.run_dir is not None)

    t0 = time.perf_counter()
    sub = construct_subnetwork(space, variables)
    seconds = time.perf_counter() - t0
    print(f"constructed the sub-network in {seconds:.2f} s")

    x = _random_input(np.random.default_rng(1), (4, *sample.shape[1:]), sample.dtype,
                      num_classes or models.spec(name).num_classes)
    diff = relative_difference(_jit_apply(model.apply)(variables, x),
                                _jit_apply(sub.apply)(sub.variables, x))
    print(f"check on a random batch of {x.shape[0]}: max relative difference to the zeroed full "
          f"network {diff:.2e}")
    if not diff <= _TOLERANCE:
        print(f"error: the sub-network differs from the zeroed full network ({diff:.2e} > "
              f"{_TOLERANCE:.0e}); nothing was saved. This is a bug of asgssd-jax: please report "
              "it with the model and the zero groups", file=sys.stderr)
        return 1

    out.mkdir(parents=True, exist_ok=True)
    if "run_dir" in source:  # paths in construct.json are relative to its directory
        source["run_dir"] = os.path.relpath(source["run_dir"], out)
    ckpt = out / "subnetwork_checkpoint"
    save_subnetwork(ckpt, sub, force=True)
    picture = report_lib.draw_subnetwork(sub, sample, name, out / "subnetwork.svg")
    full_params, sub_params = count_params(variables), count_params(sub.variables)
    full_macs = count_macs(model.apply, variables, sample, train=False)
    sub_macs = count_macs(sub.apply, sub.variables, sample, train=False)
    meta = {"model": name, "overrides": overrides, "num_classes": num_classes,
            "input_shape": list(sample.shape[1:]), **source, "zero_groups": zero,
            "num_groups": space.num_groups,
            "full": {"params": full_params, "macs": full_macs},
            "subnetwork": {"params": sub_params, "macs": sub_macs},
            "relative_difference_to_zeroed_full": diff, "construction_seconds": seconds,
            "checkpoint": ckpt.name}
    (out / "construct.json").write_text(json.dumps(meta, indent=2))

    print()
    print(f"{'':<13}{'params':>14}{'MACs/example':>16}")
    print(f"{'full network':<13}{full_params:>14,}{full_macs / 1e6:>15.2f}M")
    print(f"{'sub-network':<13}{sub_params:>14,}{sub_macs / 1e6:>15.2f}M")
    print(f"{'kept':<13}{sub_params / full_params:>14.1%}{sub_macs / max(full_macs, 1):>16.1%}")
    print(f"removed {len(zero)} of {space.num_groups} removal structures: "
          f"{_group_names(space, zero)}")
    print()
    print(f"wrote {ckpt}, {picture}, {out / 'construct.json'}")
    print(f"export it with: asgssd export {out}")
    return 0


_TOLERANCE = 1e-4  # max relative difference accepted between sub-network and zeroed network


def _check_valid(space, zero: list[int], name: str, *, from_run: bool) -> None:
    if space.is_valid(zero):
        return
    hint = ("the run's optimizer cut every path (e.g. --optimizer dhspg at a high "
            "--target-sparsity); run again with a lower --target-sparsity or with h2spg"
            if from_run else "keep at least one path from the input to the output; "
            f"`asgssd space --model {name}` shows the groups")
    raise ValueError(f"the zero groups {zero} of {name} form an invalid set: without them no "
                     f"path joins the input to the output. To fix: {hint}")


def _jit_apply(apply_fn):
    """``apply_fn(variables, *x, train=False)``, compiled (eager runs each op on its own)."""
    import jax

    return jax.jit(lambda v, *x: apply_fn(v, *x, train=False))


def _create_model(name: str, overrides: dict, num_classes: int | None):
    import asgssd_zoo as models

    kwargs = dict(overrides)
    if num_classes is not None and "num_classes" not in kwargs:
        kwargs["num_classes"] = num_classes
    try:
        return models.create(name, **kwargs)
    except TypeError as e:
        raise ValueError(f"cannot build {name} with {kwargs}: {e}") from None


def _run_model(run_dir: Path, model: str | None, overrides: dict
               ) -> tuple[str, dict, int | None]:
    """The zoo model name, field overrides and number of classes (None: not recorded) of a
    run: config.json's (written when the run starts), else report.json's config, else
    ``--model``/``--set``."""
    for fname in ("config.json", "report.json"):
        path = run_dir / fname
        if path.exists():
            data = json.loads(path.read_text())
            cfg = data.get("config", data)
            if "model" not in cfg:
                raise ValueError(f"{path} records no model; pass --model NAME (and --set)")
            if model is not None and model != cfg["model"]:
                raise ValueError(f"{path} says the run trained {cfg['model']!r}, not {model!r}: "
                                 "leave out --model")
            _zoo_spec(cfg["model"])
            return (cfg["model"], {**(cfg.get("overrides") or {}), **overrides},
                    data.get("num_classes"))
    if model is None:
        raise FileNotFoundError(
            f"{run_dir} has neither report.json nor config.json, so the model it trained is "
            "unknown (a run killed before it finished): pass --model NAME and any --set "
            "FIELD=VALUE the run used")
    _zoo_spec(model)
    return model, overrides, None


def _latest_h2spg_checkpoint(run_dir: Path) -> tuple[Path, int]:
    """The directory of a run's H2SPG checkpoints (written by train.fit) and its latest step."""
    import orbax.checkpoint as ocp

    ckpt_dir = (run_dir / "checkpoints" / "h2spg").absolute()
    steps = []
    if ckpt_dir.is_dir():
        with ocp.CheckpointManager(ckpt_dir) as manager:
            steps = manager.all_steps()
    if not steps:
        raise FileNotFoundError(
            f"no H2SPG checkpoint in {ckpt_dir}: is {run_dir} the --out directory of an "
            "`asgssd run` that finished at least one epoch?")
    return ckpt_dir, int(max(steps))


def _restore_trained(ckpt_dir: Path, step: int) -> dict:
    """The full variables (params, batch_stats) of a train.fit checkpoint."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(ckpt_dir) as manager:
        state = manager.restore(step, args=ocp.args.StandardRestore())
    variables = {"params": state["params"]}
    if state.get("batch_stats"):
        variables["batch_stats"] = state["batch_stats"]
    return variables


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    """Leaf path -> shape, for arrays, shape structs and orbax's array metadata alike."""
    import jax

    from asgssd_jax.trace import leaf_path

    flat, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict))
    return {leaf_path(p): tuple(x.shape) for p, x in flat}


def _infer_num_classes(name: str, overrides: dict, shapes: dict[str, tuple[int, ...]]
                       ) -> int | None:
    """The ``num_classes`` a run built ``name`` with (it comes from the dataset): the size of
    the axis that follows ``num_classes`` in the saved variables' shapes."""
    import jax

    import asgssd_zoo as models

    if "num_classes" in overrides:
        return None
    default = models.spec(name).num_classes
    sample = _zoo_sample(name)
    a, b = (_shapes(jax.eval_shape(_create_model(name, overrides, c).init,
                                   jax.random.key(0), sample)) for c in (default, default + 1))
    for path, shape in a.items():
        got = shapes.get(path)
        if shape == b.get(path) or got is None or len(got) != len(shape):
            continue
        for axis, (sa, sb) in enumerate(zip(shape, b[path])):
            if (sa, sb) == (default, default + 1):
                return int(got[axis])
    return default


def _check_variables_match(model, variables, sample, name: str, overrides: dict) -> None:
    import jax

    want = _shapes(jax.eval_shape(model.init, jax.random.key(0), sample))
    got = _shapes(variables)
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:3]
        raise ValueError(f"the checkpoint's variables do not fit {name} with overrides "
                         f"{overrides} (first differences: {diff}); pass the --set FIELD=VALUE "
                         "the run used")


def _zoo_spec(name: str):
    import asgssd_zoo as models

    try:
        return models.spec(name)
    except KeyError as e:  # a KeyError's message would print with quotes
        raise ValueError(e.args[0]) from None


def _parse_group_indices(text: str, num_groups: int | None, name: str) -> list[int]:
    try:
        idx = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise ValueError(f"--zero-groups expects comma-separated group indices such as 0,2; got "
                         f"{text!r}") from None
    if num_groups is None:
        return idx
    bad = [i for i in idx if not 0 <= i < num_groups]
    if bad or not idx:
        raise ValueError(
            f"--zero-groups {text!r}: {'indices ' + str(bad) + ' are' if bad else 'no index is'} "
            f"not in the valid range 0..{num_groups - 1} ({name} has {num_groups} removal "
            f"structures; `asgssd space --model {name}` lists them)")
    return sorted(set(idx))


def _group_names(space, indices) -> str:
    """``g0 (conv2/bn, conv2/conv), g3 (...)``: each group's modules."""

    def modules(i: int) -> str:
        paths = space.groups[i].param_paths
        return ", ".join(sorted({"/".join(p.split("/")[1:-1]) or p for p in paths}))

    return ", ".join(f"g{i} ({modules(i)})" for i in indices)


def _add_construct_parser(sub) -> None:
    p = sub.add_parser(
        "construct", help="build the sub-network of a run's checkpoint, or of chosen groups",
        description="Rebuilds the sub-network from the latest H2SPG checkpoint of an `asgssd "
        "run` directory (finished or killed), or, with --model and --zero-groups, from a zoo "
        "model at random initialisation with those groups set to zero. Checks that it computes "
        "what the zeroed full network computes and writes its orbax checkpoint, picture and "
        "construct.json into --out.")
    p.add_argument("run_dir", nargs="?", help="the --out directory of an `asgssd run`")
    p.add_argument("--model", help="zoo model (with --zero-groups; or the model of a killed run "
                   "that left no report.json)")
    p.add_argument("--zero-groups", dest="zero_groups", metavar="I,J,...",
                   help="groups to zero in the randomly initialised --model "
                   "(see `asgssd space --model NAME`)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (with --model)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override a model field, e.g. --set width=2 (repeatable)")
    p.add_argument("--out", help="output directory (default: RUN_DIR/construct, or "
                   "runs/construct-MODEL)")
    p.set_defaults(func=_construct_cmd)


def _export_cmd(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    import asgssd_zoo as models
    from asgssd_jax import (
        export_subnetwork,
        load_exported,
        load_subnetwork,
        relative_difference,
    )

    ckpt = _find_subnetwork_checkpoint(Path(args.path))
    name, overrides, num_classes, input_shape = _checkpoint_model(ckpt, args)
    model = _create_model(name, overrides, num_classes)
    print(f"loading the sub-network of {name} from {ckpt}")
    try:
        sub = load_subnetwork(ckpt, model.apply)
    except ValueError as e:
        raise ValueError(f"{e} (the checkpoint does not fit {name} with {overrides}: pass "
                         "--model and --set FIELD=VALUE as when it was made)") from None
    sample_args = sub.plan.sample_args
    if sample_args is None:
        sample_args = (jax.ShapeDtypeStruct((1, *input_shape), models.input_dtype(name)),)
    sample_args = tuple(sample_args)
    if args.batch is not None and args.batch < 1:
        raise ValueError(f"--batch must be at least 1, got {args.batch}")
    platforms = [p for p in (args.platforms or "").split(",") if p] or None
    if args.out:
        path = Path(args.out)
    else:  # beside the checkpoint, where `asgssd run` writes its own export: no second copy
        path = ckpt.parent / ("subnetwork.jax_export" if args.batch is None else
                              f"subnetwork_batch{args.batch}.jax_export")
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = "symbolic batch dimension" if args.batch is None else f"fixed batch {args.batch}"
    print(f"exporting with jax.export ({batch}"
          + (f", platforms {', '.join(platforms)}" if platforms else "") + ")")
    exported = export_subnetwork(
        sub, *sample_args, path=path, platforms=platforms, train=False,
        **({} if args.batch is None else {"batch_dim": str(args.batch)}))
    mlir = path.with_suffix(".mlir")
    mlir.write_text(exported.exported.mlir_module())
    print(f"wrote {path} ({_size(path)}) and {mlir} ({_size(mlir)})")

    backends = {"cuda": "gpu", "rocm": "gpu"}
    if platforms and jax.default_backend() not in [backends.get(p, p) for p in platforms]:
        print(f"not checking the artifact: it was lowered for {', '.join(platforms)}, this "
              f"machine runs {jax.default_backend()}")
        return 0
    loaded = load_exported(path)
    sizes = (2, 5) if args.batch is None else (args.batch,)
    rng = np.random.default_rng(0)
    reference = _jit_apply(sub.apply)
    worst = 0.0
    for n in sizes:
        x = tuple(_random_input(rng, (n, *a.shape[1:]), a.dtype, num_classes or 2)
                  for a in sample_args)
        diff = relative_difference(reference(sub.variables, *x), loaded(*x))
        print(f"reloaded artifact vs sub-network, batch {n}: max relative difference {diff:.2e}")
        worst = max(worst, diff)
    if not worst <= _TOLERANCE:
        print(f"error: the reloaded artifact differs from the sub-network ({worst:.2e} > "
              f"{_TOLERANCE:.0e}); this is a bug of asgssd-jax: please report it", file=sys.stderr)
        return 1
    return 0


def _find_subnetwork_checkpoint(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass an `asgssd run` directory, an "
                                "`asgssd construct` --out directory, or a sub-network checkpoint")
    for cand in (path / "subnetwork_checkpoint", path / "construct" / "subnetwork_checkpoint"):
        if cand.is_dir():
            return cand
    if (path / "plan").is_dir() and (path / "variables").is_dir():  # save_subnetwork's layout
        return path
    raise FileNotFoundError(
        f"no sub-network checkpoint in {path} (looked for subnetwork_checkpoint/ and "
        "construct/subnetwork_checkpoint/): run `asgssd construct "
        f"{path}` first, or pass the checkpoint directory itself")


def _checkpoint_model(ckpt: Path, args: argparse.Namespace
                      ) -> tuple[str, dict, int | None, tuple[int, ...]]:
    """Model name, overrides, num_classes and input shape a sub-network checkpoint was made
    with: from construct.json or report.json next to it, else --model/--set."""
    import asgssd_zoo as models

    overrides = _parse_overrides(args.set or [])
    meta_path = ckpt.parent / "construct.json"
    if meta_path.exists() and args.model is None:
        meta = json.loads(meta_path.read_text())
        return (meta["model"], {**meta.get("overrides", {}), **overrides}, meta.get("num_classes"),
                tuple(meta["input_shape"]))
    num_classes = None
    if any((ckpt.parent / f).exists() for f in ("config.json", "report.json")) \
            and args.model is None:
        name, overrides, num_classes = _run_model(ckpt.parent, None, overrides)
    elif args.model is not None:
        name = args.model
        _zoo_spec(name)
    else:
        raise FileNotFoundError(
            f"no construct.json or report.json next to {ckpt}, so its model is unknown: pass "
            "--model NAME (and --set FIELD=VALUE as when it was made)")
    if num_classes is None:
        num_classes = _infer_num_classes(name, overrides, _checkpoint_shapes(ckpt))
    return name, overrides, num_classes, tuple(models.input_shape(name))


def _checkpoint_shapes(ckpt: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of a sub-network checkpoint's variables, read from orbax's metadata."""
    import logging

    import orbax.checkpoint as ocp

    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # orbax warns about a missing step-metadata file
    try:
        tree = ocp.StandardCheckpointer().metadata((ckpt / "variables").absolute())
        tree = getattr(getattr(tree, "item_metadata", tree), "tree", tree)
        return _shapes(tree)
    except Exception:  # an unknown layout: fall back to the zoo's num_classes
        return {}
    finally:
        absl_logger.setLevel(level)


def _size(path: Path) -> str:
    n = path.stat().st_size
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _add_export_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="export a saved sub-network with jax.export (+ StableHLO text)",
        description="Loads the sub-network saved by `asgssd run` or `asgssd construct`, exports "
        "it with jax.export (symbolic batch dimension unless --batch), writes the serialized "
        "artifact (load it with asgssd_jax.load_exported; no model code needed) and its "
        "StableHLO as .mlir, and checks the reloaded artifact against the sub-network.")
    p.add_argument("path", help="an `asgssd run` directory, an `asgssd construct` --out "
                   "directory, or a sub-network checkpoint directory")
    p.add_argument("--out", help="artifact file (default: subnetwork.jax_export, or "
                   "subnetwork_batchN.jax_export with --batch N, beside the checkpoint); the "
                   ".mlir goes next to it")
    p.add_argument("--batch", type=int, help="fixed batch size instead of a symbolic one")
    p.add_argument("--platforms", help="comma-separated lowering platforms, e.g. cpu,cuda "
                   "(default: this machine's)")
    p.add_argument("--model", help="zoo model of a checkpoint with no construct.json or "
                   "report.json beside it")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="model field override the checkpoint was made with (repeatable)")
    p.set_defaults(func=_export_cmd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="asgssd",
        description="Automated search-space generation and sub-network search for JAX/Flax.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(sub)
    sub.add_parser(
        "models", help="list the zoo's networks",
        description="Lists the zoo's networks (`asgssd run --model NAME`) with the input shape, "
        "the dataset each is built for (the paper's, for its networks), the task `asgssd run` "
        "trains it for and the dataset it then reads by default (--dataset), and the pairs of "
        "--model and --dataset that work.").set_defaults(func=_models_cmd)
    p = sub.add_parser(
        "report", help="print a run's report and redraw its pictures and plots",
        description="Redraws every picture of an `asgssd run` directory (the graphs from their "
        ".dot files, with Graphviz's dot when installed, else matplotlib; the plots from "
        "report.json), rewrites report.md and prints it.")
    p.add_argument("run_dir", help="the --out directory of an `asgssd run`")
    p.set_defaults(func=_report_cmd)
    p = sub.add_parser(
        "space", help="print and draw the search space of a zoo model",
        description="Generates the search space of a zoo model at random initialisation "
        "(trace graph -> segment graph -> removal structures, Algorithm 2), prints its groups "
        "with their params, MACs and operators, and draws the trace graph and the segment graph "
        "into --out with search_space.json.")
    p.add_argument("--model", default="demonet", help="zoo model name (default: demonet)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the traced sample")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed")
    p.add_argument("--out", default="runs/space", help="directory for pictures and JSON "
                   "(default: runs/space; '' to skip)")
    p.set_defaults(func=_space_cmd)
    _add_construct_parser(sub)
    _add_export_parser(sub)
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
