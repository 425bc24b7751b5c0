"""Algorithm 1 end to end: search space -> H2SPG training -> sub-network -> fine-tuning.

``run(RunConfig(...))`` trains a zoo network on a dataset and leaves in ``config.out``: the
report (``report.json``, ``report.md``), pictures of the trace graph, the segment graph, the
redundant structures and the sub-network (SVG), plots of loss/accuracy and group sparsity
(PNG), the sub-network's orbax checkpoint and its ``jax.export`` artifact.

The run's task (:mod:`asgssd_jax.tasks`) follows from the model and the dataset: image
classification (accuracy), or next-character language modelling with ``decoder_lm`` on
``python_source`` (validation loss in nats per character, perplexity, next-character
accuracy). The pipeline itself is the same for both.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

import asgssd_zoo as models
from asgssd_jax import data as data_lib
from asgssd_jax import tasks as tasks_lib
from asgssd_jax import train as train_lib
from asgssd_jax.cost import count_macs, count_params
from asgssd_jax.optim import dhspg, h2spg, h2spg_info, proxsg_plus
from asgssd_jax.search_space import generate_search_space

__all__ = ["RunConfig", "run"]


@dataclasses.dataclass
class RunConfig:
    """Everything one run needs; every field is a flag of ``asgssd run``.

    Fields left ``None`` take the defaults of the run's task (``tasks.Task.defaults``, chosen
    by ``dataset``, else by ``model``) when the config is made: for an image model, DemoNet's
    settings on digits; for ``decoder_lm``, a small language model on ``python_source``
    (AdamW, 6 epochs of 50 steps).
    """

    model: str = "demonet"
    dataset: str | None = None  # digits for image models, python_source for decoder_lm
    target_sparsity: float | None = None  # 0.5; 0.25 for a language model
    epochs: int = 6
    warmup_epochs: int = 2
    projection_epochs: int = 2
    finetune_epochs: int = 0
    steps_per_epoch: int | None = None  # None: one pass over the training images; 50 for text
    batch_size: int | None = None  # 64; 32 for a language model
    learning_rate: float | None = None  # 0.1; 3e-3 for a language model
    lr_warmup_epochs: int = 1  # linear ramp of the learning rate (0: the paper's plain cosine)
    schedule: str = "cosine"  # cosine | multi_cosine | step | constant
    periods: int = 2  # cosine periods of multi_cosine
    step_epochs: int = 75  # the step schedule's learning rate falls x0.1 every step_epochs
    search_learning_rate: float | None = None  # constant rate of the search phase (Table 8)
    base: str | None = None  # sgd; adamw for a language model
    optimizer: str = "h2spg"  # h2spg | dhspg | proxsg_plus (the Table 4 ablation)
    group_lasso: float | None = None  # None: the optimizer's default push on redundant groups
    fade_out: bool = False  # OTO's HESSO-style scheduled fade-out instead of the half-space test
    momentum: float = 0.9
    weight_decay: float | None = None  # 0; 0.01 for a language model
    mixup: float = 0.0
    seed: int = 0
    data_dir: str | None = None
    train_size: int | None = None
    test_size: int | None = None
    context_length: int | None = None  # language modelling: characters per window (the model's)
    baseline: bool = False  # also train the full network with the base optimizer alone
    out: str | None = None  # runs/MODEL-DATASET
    resume: bool = False  # continue the run in ``out`` from its last checkpoint
    overwrite: bool = False  # replace the run in ``out``
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # model fields

    def __post_init__(self) -> None:
        task = tasks_lib.default_task(self.model, self.dataset)
        for name, value in task.defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.out is None:
            self.out = f"runs/{self.model}-{self.dataset}"

    @property
    def task(self) -> tasks_lib.Task:
        """The run's task; a model and dataset that do not pair raise ``ValueError``."""
        return tasks_lib.task_for(self.model, self.dataset)

    def validate(self) -> None:
        if not 0.0 <= self.target_sparsity < 1.0:
            raise ValueError(f"--target-sparsity must be in [0, 1), got {self.target_sparsity}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("--epochs and --batch-size must be at least 1")
        if self.warmup_epochs < 1 or self.projection_epochs < 1:
            raise ValueError("--warmup-epochs and --projection-epochs must be at least 1")
        if self.warmup_epochs + self.projection_epochs > self.epochs:
            raise ValueError(
                f"--warmup-epochs ({self.warmup_epochs}) + --projection-epochs "
                f"({self.projection_epochs}) must not exceed --epochs ({self.epochs})")
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {', '.join(_OPTIMIZERS)}")
        if self.lr_warmup_epochs < 0:
            raise ValueError("--lr-warmup-epochs must be at least 0")
        if self.schedule not in ("cosine", "multi_cosine", "step", "constant"):
            raise ValueError("--schedule must be cosine, multi_cosine, step or constant")
        if self.step_epochs < 1:
            raise ValueError("--step-epochs must be at least 1")
        if self.search_learning_rate is not None and not self.search_learning_rate > 0:
            raise ValueError(f"--search-lr must be positive, got {self.search_learning_rate}")
        if not self.learning_rate > 0:
            raise ValueError(f"--lr must be positive, got {self.learning_rate}")
        for name in ("steps_per_epoch", "context_length", "train_size", "test_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        self._check_flags_apply()

    def _check_flags_apply(self) -> None:
        """A setting that would be silently ignored is an error."""
        d = RunConfig()
        task = self.task
        for other in tasks_lib.TASKS:
            for name in other.own_fields if other is not task else ():
                if getattr(self, name) != getattr(d, name):
                    raise ValueError(
                        f"--{name.replace('_', '-')} applies to {other.description} only (this "
                        f"run, {self.model} on {self.dataset}, is {task.description})")
        if self.data_dir is not None and self.dataset in data_lib.BUILTIN:
            raise ValueError(
                f"--data-dir is for tensorflow-datasets data; the {self.dataset!r} dataset is "
                "built in and reads none: leave out --data-dir, or pass --dataset NAME "
                "(fashion_mnist, cifar10, svhn_cropped, stl10, imagenet2012)")
        if self.periods != d.periods and self.schedule != "multi_cosine":
            raise ValueError(f"--periods applies to --schedule multi_cosine only (this run's "
                             f"schedule is {self.schedule})")
        if self.step_epochs != d.step_epochs and self.schedule != "step":
            raise ValueError(f"--step-epochs applies to --schedule step only (this run's "
                             f"schedule is {self.schedule})")
        if self.momentum != d.momentum and self.base != "sgd":
            raise ValueError(f"--momentum applies to --base sgd only (this run's base optimizer "
                             f"is {self.base})")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite replaces it: "
                             "pass one of them")


_OPTIMIZERS = {"h2spg": h2spg, "dhspg": dhspg, "proxsg_plus": proxsg_plus}


def _schedule(cfg: RunConfig, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate over the run. With ``search_learning_rate``, the hierarchical search
    phase (H2SPG's warm-up) runs at that constant rate and ``schedule`` starts afresh from
    ``learning_rate`` after it (the paper's Table 8)."""
    warmup = cfg.lr_warmup_epochs * steps_per_epoch
    if cfg.search_learning_rate is None:
        return _main_schedule(cfg, total_steps, warmup, steps_per_epoch)
    search = cfg.warmup_epochs * steps_per_epoch
    first = train_lib.with_linear_warmup(optax.constant_schedule(cfg.search_learning_rate),
                                         cfg.search_learning_rate, min(warmup, search - 1))
    return optax.join_schedules(
        [first, _main_schedule(cfg, total_steps - search, 0, steps_per_epoch)], [search])


def _main_schedule(cfg: RunConfig, total_steps: int, warmup: int, steps_per_epoch: int
                   ) -> optax.Schedule:
    lr = cfg.learning_rate
    if cfg.schedule == "cosine":
        return train_lib.cosine_schedule(lr, total_steps, warmup)
    if cfg.schedule == "multi_cosine":
        return train_lib.multi_cosine_schedule(lr, total_steps, cfg.periods, warmup)
    if cfg.schedule == "step":
        return train_lib.with_linear_warmup(optax.exponential_decay(
            lr, cfg.step_epochs * steps_per_epoch, 0.1, staircase=True), lr, warmup)
    return train_lib.with_linear_warmup(optax.constant_schedule(lr), lr, warmup)


def _base_tx(cfg: RunConfig, schedule) -> optax.GradientTransformation:
    if cfg.base == "sgd":
        tx = optax.sgd(schedule, momentum=cfg.momentum or None)
        return optax.chain(optax.add_decayed_weights(cfg.weight_decay), tx) \
            if cfg.weight_decay else tx
    if cfg.base == "adamw":
        return optax.adamw(schedule, weight_decay=cfg.weight_decay)
    return optax.adam(schedule)


def _versions() -> dict[str, str]:
    import flax

    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "numpy": np.__version__, "python": platform.python_version(),
            "device": str(jax.devices()[0].device_kind), "devices": str(jax.device_count())}


class _Progress:
    """A rich progress bar when the output is a terminal; otherwise (a log file) a line through
    ``log`` every ``every_seconds`` (and after the first step, which includes compilation)."""

    def __init__(self, enabled: bool, log: Callable[[str], None], every_seconds: float):
        self.bar = None
        self.log = log if enabled else None
        self.every_seconds = every_seconds
        self.last = None
        self.done: dict[Any, int] = {}
        self.totals: dict[Any, tuple[str, int]] = {}
        if enabled and sys.stderr.isatty():
            try:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeRemainingColumn,
                )

                self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                    MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                                    TimeRemainingColumn(), transient=False)
            except ImportError:  # pragma: no cover
                self.bar = None

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def task(self, description: str, total: int):
        if self.bar is None:
            key = len(self.totals)
            self.totals[key], self.done[key] = (description, total), 0
            return key
        return self.bar.add_task(description, total=total, info="")

    def update(self, task, advance: int = 1, **fields):
        if self.bar is not None:
            self.bar.update(task, advance=advance, **fields)
            return
        if self.log is None:
            return
        self.done[task] += advance
        now = time.perf_counter()
        if self.last is None or now - self.last >= self.every_seconds:
            self.last = now
            description, total = self.totals[task]
            self.log(f"{description} step {self.done[task]}/{total}"
                     + (f": {fields['info']}" if fields.get("info") else ""))


def run(cfg: RunConfig, *, log: Callable[[str], None] = print, progress: bool = True,
        progress_seconds: float = 30.0) -> dict[str, Any]:
    """Runs Algorithm 1 and writes the run directory; returns the report (as report.json).

    With ``progress``, a progress bar on a terminal, or else (output to a file) a line through
    ``log`` every ``progress_seconds`` within each epoch. A directory that holds another run is
    refused unless ``cfg.resume`` (continue it) or ``cfg.overwrite`` (replace it)."""
    from asgssd_jax import report as report_lib
    from asgssd_jax.export import export_subnetwork, save_subnetwork
    from asgssd_jax.surgery import construct_subnetwork, relative_difference

    cfg.validate()
    out = Path(cfg.out)
    task = cfg.task
    ds = task.load(cfg, models.spec(cfg.model))
    _prepare_run_dir(cfg, out)
    model = models.create(cfg.model, num_classes=ds.num_outputs, **cfg.overrides)
    # What the run trains, written first so that a killed run can be rebuilt (asgssd construct).
    (out / "config.json").write_text(json.dumps(
        {**dataclasses.asdict(cfg), "task": task.name, "num_classes": ds.num_outputs,
         "input_shape": list(ds.input_shape), "input_dtype": ds.input_dtype},
        indent=2, default=_json_default))
    sample = ds.sample()
    variables = jax.jit(model.init)(jax.random.key(cfg.seed), sample)
    t0 = time.perf_counter()
    space = generate_search_space(model.apply, variables, sample, train=False)
    generation_seconds = time.perf_counter() - t0
    log(f"{cfg.model} on {cfg.dataset}: {count_params(variables):,} params, "
        f"{space.num_groups} removal structures (generated in {generation_seconds:.2f} s)")

    spe = ds.steps_per_epoch
    total = cfg.epochs * spe
    schedule = _schedule(cfg, total, spe)
    tx = _OPTIMIZERS[cfg.optimizer](
        space, schedule, cfg.target_sparsity, warmup_steps=cfg.warmup_epochs * spe,
        projection_steps=cfg.projection_epochs * spe, base=_base_tx(cfg, schedule),
        fade_out=cfg.fade_out,
        **({} if cfg.group_lasso is None else {"group_lasso": cfg.group_lasso}))
    k = int(cfg.target_sparsity * space.num_groups)

    train_batches, eval_batches = ds.train_batches, ds.eval_batches

    def evaluate(apply_fn, variables) -> dict[str, float]:
        return task.summarize(train_lib.evaluate(apply_fn, variables, eval_batches()))

    def figures(evaluation: dict[str, float], prefix: str = "") -> str:
        return ", ".join(f"{m.key} {evaluation[prefix + m.key]:.4f}" for m in task.metrics)

    def last_evaluation(history) -> dict[str, Any]:
        """The ``eval_`` figures of the last epoch, and every epoch's record."""
        return {**{k: v for k, v in history.epochs[-1].items() if k.startswith("eval_")},
                "history": history.epochs}

    sparsity_curve: list[dict[str, float]] = []
    last = {}  # the H2SPG state of the last step, left on the device until the end

    with _Progress(progress, log, progress_seconds) as bar:
        progress_task = bar.task("H2SPG", total)

        def on_step(step, metrics, state):
            last["info"] = info = h2spg_info(state.opt_state)
            zero, redundant = jax.device_get((info.zero_groups, info.redundant))
            zeros = int(np.sum(zero))
            sparsity_curve.append({"step": step, "zero_groups": zeros,
                                   "redundant": int(np.sum(redundant))})
            bar.update(progress_task, info=f"loss {metrics['loss']:.3f} zero groups {zeros}/{k}")

        def on_epoch(epoch, record):
            log(f"epoch {epoch}/{cfg.epochs}: " + ", ".join(
                f"{key} {val:.4f}" for key, val in record.items() if key != "epoch"))

        t_train = time.perf_counter()
        trained, history = train_lib.fit(
            model.apply, variables, tx, train_batches, epochs=cfg.epochs, steps_per_epoch=spe,
            eval_batches=eval_batches, checkpoint_dir=out / "checkpoints" / "h2spg",
            checkpoint_every=spe, resume=cfg.resume, on_step=on_step, on_epoch=on_epoch,
            summarize=task.summarize)
        train_seconds = time.perf_counter() - t_train

        baseline = None
        if cfg.baseline:
            _, dense_hist = train_lib.fit(
                model.apply, variables, _base_tx(cfg, schedule), train_batches,
                epochs=cfg.epochs, steps_per_epoch=spe, eval_batches=eval_batches,
                on_epoch=lambda e, r: log(f"baseline epoch {e}: eval {figures(r, 'eval_')}"),
                summarize=task.summarize)
            baseline = last_evaluation(dense_hist)

    zeroing = []  # per zeroed group: its step (1-based), test or safeguard, relative norm
    if "info" in last:
        info = jax.device_get(last["info"])
        redundant, saliency = info.redundant, info.saliency
        zeroing = [{"group": int(g), "step": int(info.zero_step[g]) + 1,
                    "by": "test" if info.zeroed_by_test[g] else "safeguard",
                    "relative_norm": float(info.zero_relative_norm[g])}
                   for g in np.flatnonzero(info.zero_groups)]
    else:  # a resumed run that had no step left to do
        redundant = np.zeros(space.num_groups, bool)
        saliency = np.zeros(space.num_groups, np.float32)
    zero = space.zero_group_indices(trained)
    valid = space.is_valid(zero)
    full_eval = evaluate(model.apply, trained)
    x_check = next(iter(eval_batches()))[0][:32]
    sub, sub_report, finetune, export_error = None, None, None, None
    if not valid:
        log(f"the zero groups {zero} cut every path from the input to the output: no valid "
            "sub-network (expected with --optimizer dhspg at high sparsity)")
    else:
        t_sub = time.perf_counter()
        sub = construct_subnetwork(space, trained)
        construct_seconds = time.perf_counter() - t_sub
        sub_eval = evaluate(sub.apply, sub.variables)
        ref = model.apply(trained, x_check, train=False)
        got = sub.apply(sub.variables, x_check, train=False)
        exact_err = relative_difference(ref, got)
        log(f"sub-network: {count_params(sub.variables):,} params; " + ", ".join(
            f"{m.key} full {full_eval[m.key]:.4f}, sub {sub_eval[m.key]:.4f}"
            for m in task.metrics) + f"; relative difference to the zeroed full network "
            f"{exact_err:.2e}")
        sub_variables = sub.variables
        if cfg.finetune_epochs:
            ft_tx = _base_tx(cfg, train_lib.cosine_schedule(cfg.learning_rate * 0.1,
                                                            cfg.finetune_epochs * spe))
            sub_variables, ft_hist = train_lib.fit(
                sub.apply, sub.variables, ft_tx, lambda e: train_batches(e + cfg.epochs),
                epochs=cfg.finetune_epochs, steps_per_epoch=spe, eval_batches=eval_batches,
                summarize=task.summarize)
            finetune = last_evaluation(ft_hist)
            log(f"fine-tuned sub-network: eval {figures(finetune, 'eval_')}")
        ckpt = save_subnetwork(out / "subnetwork_checkpoint", sub, sub_variables, force=True)
        try:
            export_subnetwork(sub, x_check, path=out / "subnetwork.jax_export",
                              variables=sub_variables, train=False)
        except Exception as e:  # the last, optional artifact: the run's results stand
            export_error = f"{type(e).__name__}: {e}"
            log(f"jax.export of the sub-network failed (the run's numbers are unaffected): "
                f"{export_error}")
        sub_report = {"params": count_params(sub_variables),
                      "macs": count_macs(sub.apply, sub_variables, sample, train=False),
                      **{f"eval_{k}": v for k, v in sub_eval.items()},
                      "relative_difference_to_zeroed_full": exact_err,
                      "construction_seconds": construct_seconds,
                      # paths relative to the run directory, which may move
                      "checkpoint": ckpt.name,
                      "export": None if export_error else "subnetwork.jax_export"}

    report = {
        "model": cfg.model,
        "dataset": cfg.dataset,
        "task": {"name": task.name, **ds.details},
        "config": dataclasses.asdict(cfg),
        "search_space": {"num_groups": space.num_groups, "K": k,
                         "generation_seconds": generation_seconds,
                         "groups": [{"index": g.index, "params": g.num_params, "macs": g.macs,
                                     "param_paths": list(g.param_paths)}
                                    for g in space.groups]},
        "full": {"params": count_params(trained),
                 "macs": count_macs(model.apply, trained, sample, train=False),
                 **{f"eval_{k}": v for k, v in full_eval.items()}},
        "valid": valid,
        "subnetwork": sub_report,
        "zero_groups": zero,
        "redundant_groups": [int(i) for i in np.flatnonzero(redundant)],
        "zeroing": zeroing,
        "search_cost_seconds": _search_cost(space, saliency, k),
        "phases": {"steps_per_epoch": spe, "warmup_steps": cfg.warmup_epochs * spe,
                   "projection_steps": cfg.projection_epochs * spe, "total_steps": total},
        "train_seconds": train_seconds,
        "history": {"steps": history.steps, "epochs": history.epochs,
                    "sparsity": sparsity_curve},
        "baseline": baseline,
        "finetune": finetune,
        "export_error": export_error,
        "versions": _versions(),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_json_default))
    report_lib.write_all(report, space, sub, out, sample)
    log(f"wrote {out}/report.md, report.json, pictures and plots")
    return report


#: What a run leaves in its directory (removed by ``overwrite``; nothing else is touched).
_RUN_FILES = ["config.json", "report.json", "report.md", "checkpoints", "subnetwork_checkpoint",
              "subnetwork.jax_export", "construct", "export", "trace_graph.*",
              "segment_graph.*", "redundant_structures.*", "subnetwork.*", "loss_accuracy.png",
              "group_sparsity.png"]


def _prepare_run_dir(cfg: RunConfig, out: Path) -> None:
    """Creates ``out``; refuses one that holds another run unless resuming or overwriting it."""
    previous = sorted({p for pattern in _RUN_FILES for p in out.glob(pattern)})
    if previous and not (cfg.resume or cfg.overwrite):
        raise ValueError(
            f"{out} already holds a run ({', '.join(p.name for p in previous[:3])}"
            f"{', ...' if len(previous) > 3 else ''}): pass --resume to continue it, --overwrite "
            "to replace it, or another --out")
    if cfg.resume and (out / "config.json").exists():
        before = json.loads((out / "config.json").read_text())
        for name in ("model", "dataset", "overrides"):
            now = getattr(cfg, name)
            if before.get(name, now) != now:
                raise ValueError(f"--resume: the run in {out} has {name} {before[name]!r}, not "
                                 f"{now!r}: pass the same settings, or --overwrite to replace it")
    if cfg.overwrite:
        for p in previous:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _search_cost(space, saliency: np.ndarray, k: int) -> float:
    """Seconds the hierarchical search (Algorithm 3, lines 3-10) takes, compiled: the paper's
    "search cost"."""
    from asgssd_jax.optim.h2spg import search_graph
    from asgssd_jax.optim.search import hierarchical_search

    graph = search_graph(space)
    fn = jax.jit(lambda s: hierarchical_search(graph, s, k))
    fn(saliency).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(10):
        fn(saliency).block_until_ready()
    return (time.perf_counter() - t0) / 10


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)
