"""Trains a small BatchNorm network on fixed data; run as a script by tests/test_train.py.

    python -m tests.train_worker OUT.npz [--devices N] [--process-id I --num-processes P --port]
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    import jax

    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{args.port}", args.num_processes,
                                   args.process_id)
    import numpy as np
    import optax

    from asgssd_jax import train
    from tests.train_fixtures import batches_fn, make_model

    model, variables = make_model()
    per_process = 16 // args.num_processes

    def shard(epoch):
        for x, y in batches_fn(epoch):
            lo = args.process_id * per_process
            yield x[lo : lo + per_process], y[lo : lo + per_process]

    out, hist = train.fit(model.apply, variables, optax.sgd(0.1, momentum=0.9), shard,
                          epochs=2, steps_per_epoch=4)
    if args.process_id == 0:
        leaves = jax.tree_util.tree_leaves(out)
        np.savez(args.out, *[np.asarray(x) for x in leaves])
    print("devices", jax.device_count(), "loss", hist.steps[-1]["loss"], file=sys.stderr)


if __name__ == "__main__":
    main()
