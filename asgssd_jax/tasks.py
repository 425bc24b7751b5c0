"""What a run trains a network to do: classify images, or predict the next character.

A :class:`Task` ties the zoo models that take its kind of input to the datasets it reads, the
batches a run feeds, the metrics its evaluations report and the run settings that suit it
(the ``RunConfig`` fields left ``None`` take them). :func:`task_for` pairs a model with a
dataset and refuses a pair that cannot work (an image model on text) with the pairs that do:

    >>> from asgssd_jax import tasks
    >>> tasks.task_for("decoder_lm", "python_source").name
    'language_modelling'

Both tasks train on the mean softmax cross-entropy of every prediction (``train.cross_entropy``:
one per image, one per character of a window) and evaluate with ``train.evaluate``, which gives
the mean loss and the fraction of correct predictions; a task adds figures derived from these
(the perplexity, ``exp`` of the loss in nats per character).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import numpy as np

import asgssd_zoo as zoo
from asgssd_jax import data as data_lib
from asgssd_jax import text

if TYPE_CHECKING:  # pragma: no cover
    import jax

    from asgssd_jax.pipeline import RunConfig

__all__ = ["CLASSIFICATION", "LANGUAGE_MODELLING", "TASKS", "Metric", "RunData", "Task",
           "default_task", "get", "task_for"]

Batch = tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Metric:
    """One figure of an evaluation.

    Attributes:
      key: its name in an evaluation (``report["full"]["eval_" + key]``).
      label: its column header in report.md and axis label in the plots.
      derive: computes it from the evaluation's other figures (``None``: ``train.evaluate``
        measures it).
    """

    key: str
    label: str
    derive: Callable[[Mapping[str, float]], float] | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class RunData:
    """A task's data, ready for a run.

    Attributes:
      num_outputs: the model's output width: the number of classes, or the vocabulary size.
      input_shape: per example: (H, W, C) of an image, (length,) of a window of characters.
      input_dtype: ``"float32"`` (images) or ``"int32"`` (character codes).
      steps_per_epoch: training steps between two evaluations.
      train_batches: ``train_batches(epoch)`` yields that epoch's ``(x, y)`` batches, a pure
        function of the run's seed and ``epoch``.
      eval_batches: ``eval_batches()`` yields the held-out batches, in order.
      details: what report.json records about the data (sizes).
    """

    num_outputs: int
    input_shape: tuple[int, ...]
    input_dtype: str
    steps_per_epoch: int
    train_batches: Callable[[int], Iterator[Batch]]
    eval_batches: Callable[[], Iterable[Batch]]
    details: dict[str, Any]

    def sample(self) -> jax.Array:
        """A batch of one zero input, for tracing."""
        return jnp.zeros((1, *self.input_shape), self.input_dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """A kind of learning problem a run can train on.

    Attributes:
      name: ``"classification"`` or ``"language_modelling"`` (report.json's ``task.name``).
      description: in words, for messages.
      inputs: what its models take, in words.
      input_dtype: the dtype of the inputs of the zoo models this task trains
        (``zoo.input_dtype(name)``).
      datasets: the datasets it names in help and errors.
      metrics: what an evaluation reports, the headline figure first.
      defaults: ``RunConfig`` fields that suit this task (used where a config leaves them
        ``None``).
      own_fields: ``RunConfig`` fields that only this task reads.
      load: ``load(config, model_spec) -> RunData``.
      more_datasets: what else it reads, in words, after ``datasets``.
    """

    name: str
    description: str
    inputs: str
    input_dtype: str
    datasets: tuple[str, ...]
    metrics: tuple[Metric, ...]
    defaults: Mapping[str, Any]
    own_fields: tuple[str, ...]
    load: Callable[[RunConfig, zoo.ModelSpec], RunData]
    more_datasets: str = ""

    def summarize(self, evaluation: Mapping[str, float]) -> dict[str, float]:
        """``evaluation`` (from ``train.evaluate``) with this task's derived figures added."""
        out = dict(evaluation)
        for m in self.metrics:
            if m.derive is not None:
                out[m.key] = m.derive(out)
        return out

    def models(self) -> list[str]:
        """The zoo models this task trains."""
        return [n for n in zoo.names() if zoo.input_dtype(n) == self.input_dtype]


def _steps_per_epoch(requested: int | None, per_pass: int, what: str) -> int:
    if requested is None:
        return per_pass
    if requested > per_pass:
        raise ValueError(f"--steps-per-epoch {requested} exceeds the {per_pass} batches of one "
                         f"pass over {what}: lower it, or leave it out for one pass an epoch")
    return requested


def _load_images(cfg: RunConfig, spec: zoo.ModelSpec) -> RunData:
    ds = data_lib.load(cfg.dataset, data_dir=cfg.data_dir, input_shape=spec.input_shape,
                       train_size=cfg.train_size, test_size=cfg.test_size)
    spe = _steps_per_epoch(cfg.steps_per_epoch, data_lib.num_batches(ds.train, cfg.batch_size),
                           f"the {len(ds.train)} training images")

    def train_batches(epoch: int) -> Iterator[Batch]:
        return data_lib.batches(ds.train, cfg.batch_size, seed=cfg.seed, epoch=epoch,
                                augment=ds.augment, mixup_alpha=cfg.mixup)

    def eval_batches() -> Iterable[Batch]:
        return data_lib.batches(ds.test, 256, shuffle=False, drop_remainder=False)

    return RunData(ds.num_classes, tuple(ds.input_shape), "float32", spe, train_batches,
                   eval_batches, {"num_classes": ds.num_classes, "train_examples": len(ds.train),
                                  "test_examples": len(ds.test)})


_EVAL_BATCH = 64  # windows per evaluation batch


def _load_text(cfg: RunConfig, spec: zoo.ModelSpec) -> RunData:
    length = cfg.context_length or spec.input_shape[0]
    ds = text.load_python_source(length)

    def windows(stream: np.ndarray, count: int | None) -> np.ndarray:
        # ``count`` windows of length + 1 characters need (count + 1) * length characters
        return stream if count is None else stream[:(count + 1) * length]

    train, test = windows(ds.train, cfg.train_size), windows(ds.test, cfg.test_size)
    per_pass = text.num_batches(train, length, cfg.batch_size)
    if per_pass < 1:
        raise ValueError(f"--train-size {cfg.train_size} windows make no batch of "
                         f"{cfg.batch_size}: raise --train-size or lower --batch-size")
    if text.num_batches(test, length, 1) < 1:
        raise ValueError(f"--test-size {cfg.test_size} leaves no evaluation window: raise it")
    # A pass over the whole text is long (1.6M characters): an epoch is a number of steps,
    # and the batches run on, pass after pass, across epochs.
    spe = cfg.steps_per_epoch or per_pass

    def train_batches(epoch: int) -> Iterator[Batch]:
        return itertools.islice(
            text.batches_from(train, length, cfg.batch_size, epoch * spe, seed=cfg.seed), spe)

    def eval_batches() -> Iterable[Batch]:
        return text.batches(test, length, _EVAL_BATCH, shuffle=False, drop_remainder=False)

    return RunData(ds.vocab_size, (length,), "int32", spe, train_batches, eval_batches,
                   {"vocab_size": ds.vocab_size, "context_length": length,
                    "train_characters": len(train),
                    "eval_characters": text.num_batches(test, length, 1) * length})


CLASSIFICATION = Task(
    name="classification",
    description="image classification",
    inputs="images",
    input_dtype="float32",
    datasets=data_lib.DATASETS,
    metrics=(Metric("accuracy", "test accuracy"),),
    defaults={"dataset": "digits", "target_sparsity": 0.5, "batch_size": 64,
              "learning_rate": 0.1, "base": "sgd", "weight_decay": 0.0},
    own_fields=("data_dir", "mixup"),
    load=_load_images,
    more_datasets=" or another prepared TFDS image dataset",
)

LANGUAGE_MODELLING = Task(
    name="language_modelling",
    description="next-character language modelling",
    inputs="character codes (int32 tokens)",
    input_dtype="int32",
    datasets=("python_source",),
    metrics=(Metric("loss", "validation loss (nats/char)"),
             Metric("perplexity", "perplexity", derive=lambda e: math.exp(e["loss"])),
             Metric("accuracy", "next-char accuracy")),
    # 6 epochs of 50 steps (the shared epoch settings): 300 steps, a few minutes on a CPU
    defaults={"dataset": "python_source", "target_sparsity": 0.25, "batch_size": 32,
              "learning_rate": 3e-3, "base": "adamw", "weight_decay": 0.01,
              "steps_per_epoch": 50},
    own_fields=("context_length",),
    load=_load_text,
)

#: Every task; a dataset no task names is an image dataset (TFDS).
TASKS = (CLASSIFICATION, LANGUAGE_MODELLING)


def get(name: str) -> Task:
    """The task called ``name`` (report.json's ``task.name``)."""
    for task in TASKS:
        if task.name == name:
            return task
    raise ValueError(f"unknown task {name!r}; the tasks are "
                     f"{', '.join(t.name for t in TASKS)}")


def _task_of_dataset(dataset: str) -> Task:
    return next((t for t in TASKS if dataset in t.datasets and t is not CLASSIFICATION),
                CLASSIFICATION)


def _task_of_model(model: str) -> Task:
    dtype = zoo.input_dtype(model)
    for task in TASKS:
        if task.input_dtype == dtype:
            return task
    raise ValueError(f"no task trains {model!r}, whose input is {dtype}")


def default_task(model: str, dataset: str | None) -> Task:
    """The task whose defaults a run of ``model`` on ``dataset`` takes: the dataset's, else
    the model's; no error for a wrong pair (:func:`task_for` says what is wrong)."""
    if dataset is not None:
        return _task_of_dataset(dataset)
    try:
        return _task_of_model(model)
    except (KeyError, ValueError):  # an unknown model: the run says so
        return CLASSIFICATION


def pairs() -> str:
    """The model-dataset pairs that work, in words."""

    def models(task: Task) -> str:
        names = task.models()
        return ", ".join(names) if len(names) <= 3 else ", ".join(names[:3]) + ", ..."

    return "; ".join(f"{models(t)} with {', '.join(t.datasets)}{t.more_datasets}"
                     for t in reversed(TASKS))


def task_for(model: str, dataset: str) -> Task:
    """The task of training ``model`` on ``dataset``.

    Raises:
      KeyError: ``model`` is not in the zoo.
      ValueError: the model's input is not the dataset's (an image model on text); the
        message lists the pairs that work.
    """
    model_task, data_task = _task_of_model(model), _task_of_dataset(dataset)
    if model_task is not data_task:
        raise ValueError(
            f"--model {model} takes {model_task.inputs} and --dataset {dataset} holds "
            f"{data_task.inputs}: they do not pair. Pairs that work: {pairs()} (`asgssd models` "
            "lists the models)")
    return model_task
