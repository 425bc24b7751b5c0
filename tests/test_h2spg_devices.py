"""H2SPG under pmap and with NamedSharding-sharded parameters, on 4 forced CPU devices.

The device count must be set before JAX starts, so the checks run in a subprocess.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import asgssd_jax as ag
    from tests.archgen import RandomNet, init_random

    assert jax.device_count() == 4, jax.devices()
    nodes = (("conv_bn", (-1,), 4), ("conv_bn", (-1,), 4), ("add", (0, 1), 4),
             ("conv_bn", (2,), 4), ("maxpool_conv", (2,), 4), ("concat", (3, 4), 8),
             ("conv_relu", (5,), 4), ("conv_bn", (5,), 4), ("add", (6, 7), 4))
    module = RandomNet(nodes=nodes, head="gap")
    variables = init_random(module, (6, 6, 3))
    xs = jax.random.normal(jax.random.key(0), (6, 8, 6, 6, 3))  # 6 steps, global batch 8
    ys = jnp.arange(6 * 8).reshape(6, 8) % 3
    space = ag.generate_search_space(module.apply, variables, xs[0, :2], train=False)
    tx = ag.h2spg(space, 0.1, 0.5, warmup_steps=2, projection_steps=2, group_lasso=0.1)

    def grads(p, x, y):
        def loss(p):
            out = module.apply({**variables, "params": p}, x, train=False)
            return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
        return jax.grad(loss)(p)

    def step(p, s, x, y):
        u, s = tx.update(grads(p, x, y), s, p)
        return optax.apply_updates(p, u), s

    def pstep(p, s, x, y):
        g = jax.lax.pmean(grads(p, x, y), "devices")
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    # One device, global batches.
    params, state = variables["params"], tx.init(variables["params"])
    one = jax.jit(step)
    for t in range(6):
        params, state = one(params, state, xs[t], ys[t])

    # pmap over 4 devices, 2 examples each, gradients pmean'ed.
    rep = lambda tree: jax.tree_util.tree_map(lambda x: jnp.stack([x] * 4), tree)
    pp, ps = rep(variables["params"]), rep(tx.init(variables["params"]))
    par = jax.pmap(pstep, axis_name="devices")
    for t in range(6):
        pp, ps = par(pp, ps, xs[t].reshape(4, 2, 6, 6, 3), ys[t].reshape(4, 2))

    # jit with parameters sharded over the output-channel axis, batch sharded too.
    mesh = Mesh(np.array(jax.devices()), ("d",))
    def shard(x):
        spec = P(*([None] * (x.ndim - 1) + ["d"])) if x.ndim and x.shape[-1] % 4 == 0 else P()
        return jax.device_put(x, NamedSharding(mesh, spec))
    sp = jax.tree_util.tree_map(shard, variables["params"])
    ss = tx.init(sp)
    batch = NamedSharding(mesh, P("d"))
    for t in range(6):
        sp, ss = one(sp, ss, jax.device_put(xs[t], batch), jax.device_put(ys[t], batch))
    assert any(len(x.sharding.device_set) == 4 for x in jax.tree_util.tree_leaves(sp))

    want = set(space.zero_group_indices(params))
    assert len(want) == 3 and space.is_valid(want), want
    first = lambda tree: jax.tree_util.tree_map(lambda x: x[0], tree)
    for other_p, other_s in ((first(pp), first(ps)), (sp, ss)):
        assert set(space.zero_group_indices(other_p)) == want
        np.testing.assert_array_equal(np.asarray(ag.h2spg_info(other_s).redundant),
                                      np.asarray(ag.h2spg_info(state).redundant))
        for a, b in zip(jax.tree_util.tree_leaves(other_p), jax.tree_util.tree_leaves(params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    for a in jax.tree_util.tree_leaves(pp):  # replicas agree bit for bit
        assert all(np.array_equal(np.asarray(a[0]), np.asarray(a[i])) for i in range(4))
    print("DEVICES-OK")
""")


def test_pmap_and_sharded_parameters_give_the_single_device_result():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "DEVICES-OK" in done.stdout, done.stdout + done.stderr[-4000:]
