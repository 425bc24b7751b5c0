"""A reference training loop: jit, data-parallel over every device, orbax checkpoints.

``fit`` trains any linen model that predicts classes: an image classifier (logits
``[B, classes]``) or a language model (logits ``[B, T, vocab]`` for next-token targets
``[B, T]``), on the mean cross-entropy of every prediction. The model is ``apply(variables, x)``,
called with ``train=True`` or
``False`` when the model's ``__call__`` takes ``train``; BatchNorm statistics in
``batch_stats``) with any optax transformation, H2SPG included. Batches are sharded over a 1-D
``Mesh`` of all devices (of all processes after ``jax.distributed.initialize``) along the batch
axis, parameters are replicated; XLA then computes BatchNorm statistics and gradients over the
global batch, so one device and N devices (or N processes) give the same result for the same
global batches.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "TrainState",
    "cosine_schedule",
    "cross_entropy",
    "evaluate",
    "hard_labels",
    "fit",
    "mode_kwargs",
    "make_mesh",
    "make_train_step",
    "multi_cosine_schedule",
    "with_linear_warmup",
]


class TrainState(NamedTuple):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def with_linear_warmup(schedule: optax.Schedule, peak: float, warmup_steps: int
                       ) -> optax.Schedule:
    """``schedule`` preceded by a linear ramp from ``peak / warmup_steps`` to ``peak`` over
    ``warmup_steps``; ``schedule`` then starts at its own step 0."""
    if warmup_steps <= 0:
        return schedule
    ramp = optax.linear_schedule(peak / warmup_steps, peak, warmup_steps)
    return optax.join_schedules([ramp, schedule], [warmup_steps])


def cosine_schedule(learning_rate: float, total_steps: int, warmup_steps: int = 0
                    ) -> optax.Schedule:
    """Cosine annealing from ``learning_rate`` to 0 over ``total_steps`` (the first
    ``warmup_steps`` of them a linear ramp up to ``learning_rate``)."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    if warmup_steps <= 0:
        return optax.cosine_decay_schedule(learning_rate, max(total_steps, 1))
    return optax.warmup_cosine_decay_schedule(learning_rate / warmup_steps, learning_rate,
                                              warmup_steps, total_steps)


def multi_cosine_schedule(learning_rate: float, total_steps: int, periods: int,
                          warmup_steps: int = 0) -> optax.Schedule:
    """Cosine annealing restarted ``periods`` times (the paper's DARTS / SuperResNet setting),
    after an optional linear ramp of ``warmup_steps``."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    period = max((total_steps - warmup_steps) // max(periods, 1), 1)
    return with_linear_warmup(optax.join_schedules(
        [optax.cosine_decay_schedule(learning_rate, period) for _ in range(periods)],
        [period * (i + 1) for i in range(periods - 1)],
    ), learning_rate, warmup_steps)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over every prediction: ``labels`` are class ids (one axis
    fewer than ``logits``: ``[B]`` for ``[B, C]``, next tokens ``[B, T]`` for ``[B, T, V]``) or
    (MixUp) soft labels of ``logits``' shape."""
    return _prediction_losses(logits, labels).mean()


def _prediction_losses(logits: jax.Array, labels: jax.Array) -> jax.Array:
    if labels.ndim == logits.ndim:
        return optax.softmax_cross_entropy(logits, labels)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def hard_labels(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The class id of each prediction: ``labels`` themselves, or soft labels' argmax."""
    return labels if labels.ndim == logits.ndim - 1 else jnp.argmax(labels, -1)


def make_mesh(devices: Iterable[Any] | None = None) -> Mesh:
    """A 1-D data-parallel mesh over ``devices`` (default: every device of every process)."""
    devices = list(devices) if devices is not None else jax.devices()
    return Mesh(np.array(devices), ("data",))


def mode_kwargs(apply_fn: Callable[..., Any], train: bool) -> dict[str, bool]:
    """``{"train": train}`` when ``apply_fn`` (or the linen module whose ``apply`` it is) takes
    a ``train`` argument, else ``{}``: models without dropout or BatchNorm need none."""
    target = apply_fn
    module = getattr(apply_fn, "__self__", None)
    if module is not None and callable(getattr(type(module), "__call__", None)) \
            and getattr(apply_fn, "__name__", "") == "apply":
        target = module.__call__  # linen: apply forwards its keywords to __call__
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # no signature to read: assume the linen convention
        return {"train": train}
    if "train" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return {"train": train}
    return {}


def _split(variables: Any) -> tuple[Any, Any]:
    return variables["params"], variables.get("batch_stats", {})


def make_train_step(apply_fn: Callable[..., Any], tx: optax.GradientTransformation,
                    mesh: Mesh, loss_fn: Callable[..., jax.Array] = cross_entropy):
    """A jitted ``step(state, x, y) -> (state, metrics)`` sharded over ``mesh``'s batch axis."""
    replicated = NamedSharding(mesh, P())
    batch = NamedSharding(mesh, P("data"))
    mode = mode_kwargs(apply_fn, True)

    def step(state: TrainState, x, y):
        def loss(params):
            variables = {"params": params}
            if state.batch_stats:
                variables["batch_stats"] = state.batch_stats
                logits, new = apply_fn(variables, x, mutable=["batch_stats"], **mode)
                stats = new["batch_stats"]
            else:
                logits, stats = apply_fn(variables, x, **mode), state.batch_stats
            return loss_fn(logits, y), (logits, stats)

        (value, (logits, stats)), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        hard = hard_labels(logits, y)
        metrics = {"loss": value, "accuracy": jnp.mean(jnp.argmax(logits, -1) == hard),
                   "grad_norm": optax.tree.norm(grads)}
        return TrainState(state.step + 1, params, stats, opt_state), metrics

    return jax.jit(step, in_shardings=(replicated, batch, batch),
                   out_shardings=(replicated, replicated), donate_argnums=(0,))


def _global_batch(mesh: Mesh, x: np.ndarray) -> jax.Array:
    """A global array from this process's share of the batch."""
    sharding = NamedSharding(mesh, P("data"))
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, x)


def evaluate(apply_fn: Callable[..., Any], variables: Any,
             batches: Iterable[tuple[np.ndarray, np.ndarray]], mesh: Mesh | None = None
             ) -> dict[str, float]:
    """Mean loss and accuracy over every prediction of ``batches`` (any batch sizes), in
    inference mode: per image for a classifier, per token (nats per token) for a language
    model."""
    mesh = mesh or make_mesh()
    n_dev = mesh.devices.size
    mode = mode_kwargs(apply_fn, False)

    @jax.jit
    def sums(v, x, y, n):
        logits = apply_fn(v, x, **mode)
        rows = (jnp.arange(x.shape[0]) < n).reshape((-1,) + (1,) * (logits.ndim - 2))
        counted = jnp.broadcast_to(rows, logits.shape[:-1])  # padding rows are not
        correct = jnp.argmax(logits, -1) == hard_labels(logits, y)
        return (jnp.where(counted, _prediction_losses(logits, y), 0.0).sum(),
                jnp.sum(correct & counted), jnp.sum(counted))

    loss_sum = correct = total = 0.0
    for x, y in batches:
        n = len(x)
        pad = (-n) % n_dev
        if pad:
            x, y = (np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) for a in (x, y))
        s = jax.device_get(sums(variables, _global_batch(mesh, x), _global_batch(mesh, y), n))
        loss_sum, correct, total = loss_sum + float(s[0]), correct + int(s[1]), total + int(s[2])
    return {"accuracy": correct / max(total, 1), "loss": loss_sum / max(total, 1)}


@dataclasses.dataclass
class History:
    """Per-step metrics and per-epoch evaluations of a run."""

    steps: list[dict[str, float]] = dataclasses.field(default_factory=list)
    epochs: list[dict[str, float]] = dataclasses.field(default_factory=list)
    start_step: int = 0  # > 0 when the run resumed from a checkpoint


def fit(
    apply_fn: Callable[..., Any],
    variables: Any,
    tx: optax.GradientTransformation,
    train_batches: Callable[[int], Iterator[tuple[np.ndarray, np.ndarray]]],
    *,
    epochs: int,
    steps_per_epoch: int,
    eval_batches: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]] | None = None,
    mesh: Mesh | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    on_step: Callable[[int, dict[str, float], TrainState], None] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    summarize: Callable[[dict[str, float]], dict[str, float]] | None = None,
) -> tuple[Any, History]:
    """Trains for ``epochs`` x ``steps_per_epoch`` steps; returns the variables and history.

    ``train_batches(epoch)`` yields this process's share of every global batch of that epoch,
    deterministically (a resumed run skips the batches already seen). With ``checkpoint_dir``,
    the state is saved with orbax every ``checkpoint_every`` steps and at the end of each epoch;
    ``resume=True`` continues from the latest checkpoint to the same final parameters.
    ``summarize`` adds figures derived from each evaluation (``tasks.Task.summarize``: the
    perplexity of a language model); the epoch records hold them with an ``eval_`` prefix.
    """
    mesh = mesh or make_mesh()
    if not isinstance(variables, dict) or "params" not in variables:
        raise ValueError(
            "train.fit expects linen-style variables {'params': ..., 'batch_stats': ...} (got "
            f"{type(variables).__name__} without 'params'); for a plain parameter tree pass "
            "{'params': tree} and apply_fn=lambda v, x: f(v['params'], x)")
    params, stats = _split(variables)
    state = TrainState(jnp.zeros((), jnp.int32), params, stats, tx.init(params))
    # a copy: the jitted step donates its state, and the caller keeps ``variables``
    state = jax.device_put(jax.tree_util.tree_map(jnp.copy, state), NamedSharding(mesh, P()))
    manager = None
    history = History()
    if checkpoint_dir is not None:
        import orbax.checkpoint as ocp

        manager = ocp.CheckpointManager(
            Path(checkpoint_dir).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
        )
        if resume and manager.latest_step() is not None:
            abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
            state = manager.restore(manager.latest_step(),
                                    args=ocp.args.StandardRestore(abstract))
    step_fn = make_train_step(apply_fn, tx, mesh)
    start = step = history.start_step = int(state.step)
    first_epoch, skip = divmod(start, steps_per_epoch)
    for epoch in range(first_epoch, epochs):
        t0 = time.perf_counter()
        it = train_batches(epoch)
        for i in range(steps_per_epoch):
            x, y = next(it)
            if epoch == first_epoch and i < skip:
                continue
            state, metrics = step_fn(state, _global_batch(mesh, x), _global_batch(mesh, y))
            step += 1  # == state.step, counted on the host: reading it would wait for the step
            if manager is not None and checkpoint_every and step % checkpoint_every == 0:
                _save(manager, step, state)
            if on_step is not None or step % 10 == 0 or i == steps_per_epoch - 1:
                m = {k: float(v) for k, v in metrics.items()}
                m["step"] = step
                history.steps.append(m)
                if on_step is not None:
                    on_step(step, m, state)
        record = {"epoch": epoch + 1, "seconds": time.perf_counter() - t0}
        if eval_batches is not None:
            v = {"params": state.params, "batch_stats": state.batch_stats}
            evaluation = evaluate(apply_fn, v, eval_batches(), mesh)
            if summarize is not None:
                evaluation = summarize(evaluation)
            record.update({f"eval_{k}": val for k, val in evaluation.items()})
        history.epochs.append(record)
        if on_epoch is not None:
            on_epoch(epoch + 1, record)
        if manager is not None:
            _save(manager, step, state)
    if manager is not None:
        manager.wait_until_finished()
    out = {"params": state.params}
    if state.batch_stats:
        out["batch_stats"] = state.batch_stats
    return out, history


def _save(manager, step: int, state: TrainState) -> None:
    import orbax.checkpoint as ocp

    if manager.latest_step() == step:
        return
    manager.save(step, args=ocp.args.StandardSave(state))


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return max(math.floor(num_examples / batch_size), 1)
