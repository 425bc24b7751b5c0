"""Block dropping on a small LLM: H2SPG removes K of the 2L attention and MLP branches.

    python -m experiments.llm_blocks [--steps 1200] [--depth 4] [--target-sparsity 0.25]
                                     [--finetune-steps 200] [--seed 0] [--out runs/llm_blocks]

Data: character-level language modelling on the Python standard library's own source
(:mod:`asgssd_jax.text`, no download); model: the zoo's ``decoder_lm`` (RMSNorm, RoPE,
grouped-query attention, SwiGLU). Four trainings of ``--steps`` steps each, the same batches:

1. the full network with AdamW alone (the dense reference);
2. the full network with H2SPG (AdamW as its base optimizer), K = int(sparsity * 2L) branches;
   the sub-network is built from it and fine-tuned for ``--finetune-steps``;
3. the sub-network's architecture from a fresh initialisation, AdamW for ``--steps``
   (the "same size, trained from scratch" comparison of the layer-dropping literature).

Prints a Markdown table (validation loss and perplexity, params) and which branches H2SPG
removed (attention or MLP, by depth), and writes it with the figures to ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import asgssd_jax as ag
import asgssd_zoo as zoo
from asgssd_jax import text


def _loss(logits: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train(apply_fn: Callable[..., Any], variables: Any, tx: optax.GradientTransformation,
          ds: text.TextDataset, steps: int, batch: int, seed: int, train_key: str = "params"
          ) -> tuple[Any, Any, list[float]]:
    """``steps`` updates of ``variables[train_key]``; returns (variables, opt_state, losses)."""
    params = variables[train_key]

    @jax.jit
    def step(params, state, x, y):
        value, grads = jax.value_and_grad(
            lambda p: _loss(apply_fn({**variables, train_key: p}, x), y))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    state, losses, done, epoch = tx.init(params), [], 0, 0
    while done < steps:
        for x, y in text.batches(ds.train, ds.length, batch, seed=seed, epoch=epoch):
            params, state, value = step(params, state, x, y)
            losses.append(float(value))
            done += 1
            if done == steps:
                break
        epoch += 1
    return {**variables, train_key: params}, state, losses


def evaluate(apply_fn: Callable[..., Any], variables: Any, ds: text.TextDataset, batch: int,
             max_batches: int) -> float:
    """Mean validation cross-entropy (nats per character) over fixed windows."""
    fn = jax.jit(lambda v, x, y: _loss(apply_fn(v, x), y))
    values = [float(fn(variables, x, y)) for _, (x, y) in zip(
        range(max_batches), text.batches(ds.test, ds.length, batch, shuffle=False))]
    return float(np.mean(values))


def branch_name(group: ag.Group) -> str:
    """``layers_3/attn`` or ``layers_3/mlp`` for a branch group of ``decoder_lm``."""
    found = {m.group(0) for p in group.param_paths
             for m in [re.search(r"layers_\d+/(attn|mlp)", p)] if m}
    return ",".join(sorted(found)) or "/".join(group.param_paths[:1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--finetune-steps", type=int, default=200)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--target-sparsity", type=float, default=0.25)
    p.add_argument("--eval-batches", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/llm_blocks")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    ds = text.load_python_source(a.length)
    model = zoo.create("decoder_lm", depth=a.depth, dim=a.dim, mlp_dim=a.dim * 11 // 4)
    x0 = jnp.zeros((a.batch_size, a.length), jnp.int32)
    init = model.init(jax.random.key(a.seed), x0)
    space = ag.generate_search_space(model.apply, init, x0)
    print(space.summary())
    warm, proj = int(0.4 * a.steps), int(0.2 * a.steps)
    schedule = optax.warmup_cosine_decay_schedule(0.0, a.lr, max(a.steps // 20, 1), a.steps)
    rows, t0 = {}, time.time()

    def record(name, apply_fn, variables):
        loss = evaluate(apply_fn, variables, ds, a.batch_size, a.eval_batches)
        rows[name] = {"val_loss": loss, "perplexity": math.exp(loss),
                      "params": ag.count_params(variables)}
        print(f"{name}: loss {loss:.4f}, perplexity {math.exp(loss):.3f} "
              f"({time.time() - t0:.0f} s)", flush=True)

    dense, _, _ = train(model.apply, init, optax.adamw(schedule, weight_decay=0.01), ds,
                        a.steps, a.batch_size, a.seed)
    record("full network, AdamW", model.apply, dense)

    tx = ag.h2spg(space, schedule, a.target_sparsity, warmup_steps=warm, projection_steps=proj,
                  base=optax.adamw(schedule, weight_decay=0.01))
    trained, state, _ = train(model.apply, init, tx, ds, a.steps, a.batch_size, a.seed)
    info = ag.h2spg_info(state)
    removed = [int(g) for g in np.flatnonzero(np.asarray(info.zero_groups))]
    record("full network, H2SPG (zero groups in place)", model.apply, trained)
    sub = ag.construct_subnetwork(space, trained)
    record("sub-network", sub.apply, sub.variables)
    tuned, _, _ = train(sub.apply, sub.variables, optax.adamw(a.lr / 10, weight_decay=0.01), ds,
                        a.finetune_steps, a.batch_size, a.seed + 1)
    record(f"sub-network + {a.finetune_steps} fine-tune steps", sub.apply, tuned)

    fresh = model.init(jax.random.key(a.seed + 100), x0)
    scratch_sub = ag.construct_subnetwork(space, space.zero_groups(fresh, removed))
    scratch, _, _ = train(scratch_sub.apply, scratch_sub.variables,
                          optax.adamw(schedule, weight_decay=0.01), ds, a.steps, a.batch_size,
                          a.seed)
    record("sub-network's architecture from scratch, AdamW", scratch_sub.apply, scratch)

    names = [branch_name(space.groups[g]) for g in removed]
    result = {"args": vars(a), "num_groups": space.num_groups, "removed_groups": removed,
              "removed_branches": names, "rows": rows,
              "zeroed_by_test": int(np.asarray(info.zeroed_by_test).sum())
              if hasattr(info, "zeroed_by_test") else None}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"\nRemoved {len(removed)} of {space.num_groups} branches: {', '.join(names)}\n")
    print("| network | params | val loss (nats/char) | perplexity |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['params']:,} | {r['val_loss']:.4f} | {r['perplexity']:.3f} |")
    return result


if __name__ == "__main__":
    main()
