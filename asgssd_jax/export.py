"""Saving, restoring and exporting constructed sub-networks.

Two formats:

* an **orbax checkpoint** (:func:`save_subnetwork` / :func:`load_subnetwork`): the sub-network's
  plan (what is kept, sliced and folded, as JSON plus arrays; the user's treedef and leaf avals,
  PRNG key dtypes included, pickled into it) and its kept leaves (keys as their key data).
  Restoring needs the original model definition (its ``apply_fn``; the classes of custom pytree
  nodes importable) and the checkpoint, nothing else: the plan is re-applied to the model's
  traced program. The restored sub-network trains like the original.
* a **jax.export artifact** (:func:`export_subnetwork` / :func:`load_exported`): the sub-network
  lowered to StableHLO with a symbolic batch dimension, stored with its variables in one file.
  It runs with any batch size in a process that has neither the model's code nor this library.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from asgssd_jax.surgery import SubNetwork, SubNetworkPlan, SurgeryError

__all__ = [
    "ExportedSubNetwork",
    "export_subnetwork",
    "load_exported",
    "load_subnetwork",
    "save_subnetwork",
]


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp, ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_subnetwork(path: str | os.PathLike, sub: SubNetwork, variables: Any = None, *,
                    force: bool = False) -> Path:
    """Writes ``sub``'s plan and ``variables`` (default ``sub.variables``) as an orbax checkpoint.

    Args:
      path: a directory to create (``force=True`` overwrites an existing one).
      sub: the sub-network from :func:`~asgssd_jax.construct_subnetwork`.
      variables: its variables, e.g. after fine-tuning; default ``sub.variables``.

    Returns:
      The absolute checkpoint path.
    """
    ocp, ckptr = _checkpointer()
    path = Path(path).absolute()
    meta, arrays = sub.plan.to_state()
    variables = sub.variables if variables is None else variables
    leaves = sub.plan.kept_leaves(variables)
    stored = {f"leaf_{i}": np.asarray(jax.random.key_data(x) if _is_key(x) else x)
              for i, x in zip(sub.plan.kept, leaves)}
    with ckptr:
        ckptr.save(path, ocp.args.Composite(
            variables=ocp.args.StandardSave(stored),
            plan=ocp.args.JsonSave(meta),
            plan_arrays=ocp.args.StandardSave(arrays),
        ), force=force)
    return path


def _is_nnx_module(x: Any) -> bool:
    from flax import nnx

    return isinstance(x, nnx.Module)


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key)


def load_subnetwork(path: str | os.PathLike, apply_fn: Callable[..., Any]) -> SubNetwork:
    """Restores a sub-network saved by :func:`save_subnetwork`.

    Args:
      path: the checkpoint directory.
      apply_fn: the original network's ``apply_fn`` (e.g. ``models.create("demonet").apply``),
        built with the same configuration as when the sub-network was constructed; for an NNX
        sub-network, a module of the original class (its values are not used).

    Returns:
      The :class:`SubNetwork`, carrying the saved variables.

    Raises:
      SurgeryError: ``apply_fn`` does not trace to the program the plan was made for.
    """
    ocp, ckptr = _checkpointer()
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"no sub-network checkpoint at {path}")
    with ckptr:
        restored = ckptr.restore(path, ocp.args.Composite(
            variables=ocp.args.StandardRestore(),
            plan=ocp.args.JsonRestore(),
            plan_arrays=ocp.args.StandardRestore(),
        ))
    arrays = {k: np.asarray(v) for k, v in restored["plan_arrays"].items()}
    plan = SubNetworkPlan.from_state(restored["plan"], arrays)
    stored = restored["variables"]
    nnx_vars = None
    if _is_nnx_module(apply_fn):  # the NNX front-end: the module gives modes and variable types
        from asgssd_jax.surgery.nnx_module import nnx_apply, nnx_variables

        nnx_vars = nnx_variables(apply_fn)[1]
        apply_fn = nnx_apply(apply_fn)
    kept = {}
    for i in plan.kept:
        x = jnp.asarray(stored[f"leaf_{i}"])
        dtype = plan.leaf_avals[i].dtype
        kept[i] = (jax.random.wrap_key_data(x, impl=dtype._impl)
                   if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) else x)
    variables = plan.pruned(kept)
    if nnx_vars is not None:
        from asgssd_jax.surgery.nnx_module import NNXSubNetwork

        sub = NNXSubNetwork(plan, apply_fn, {plan.leaf_paths[i]: nnx_vars[
            plan.leaf_paths[i]].replace(x) for i, x in kept.items()})
    else:
        sub = SubNetwork(plan=plan, apply_fn=apply_fn, attached=variables)
    if plan.sample_args is not None:  # fail now, not at the first call, on a wrong apply_fn
        jax.eval_shape(lambda v, *a: sub.apply(v, *a), variables, *plan.sample_args)
    return sub


@dataclasses.dataclass(frozen=True)
class ExportedSubNetwork:
    """A sub-network exported with ``jax.export``, with its variables.

    Call it like the sub-network: ``exported(x)`` (or ``exported(x, variables=other)``).
    """

    exported: jax.export.Exported
    variables: Any

    def __call__(self, *args: Any, variables: Any = None) -> Any:
        return self.exported.call(self.variables if variables is None else variables, *args)

    def __repr__(self) -> str:
        # The variables' avals lead in_avals; the rest are the call's inputs.
        num_vars = len(jax.tree_util.tree_leaves(self.variables))
        avals = self.exported.in_avals[num_vars:]
        shapes = ", ".join(a.str_short(short_dtypes=True) for a in avals)
        outs = ", ".join(a.str_short(short_dtypes=True) for a in self.exported.out_avals)
        params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(self.variables))
        return (f"ExportedSubNetwork(in=[{shapes}], out=[{outs}], "
                f"platforms={tuple(self.exported.platforms)}, {params / 1e6:.2f}M values)")


def export_subnetwork(
    sub: SubNetwork,
    *sample_args: Any,
    path: str | os.PathLike | None = None,
    variables: Any = None,
    batch_dim: str = "batch",
    platforms: Sequence[str] | None = None,
    **kwargs: Any,
) -> ExportedSubNetwork:
    """Lowers ``sub.apply(variables, *args, **kwargs)`` with ``jax.export``.

    The first axis of every input becomes the symbolic dimension ``batch_dim``, so the artifact
    runs with any batch size. (A model whose program changes under a symbolic batch size is
    exported as its batch-size-1 program mapped over the examples, which needs outputs with a
    leading batch axis.) With ``path``, writes the serialized module and the variables to that
    file (reload it with :func:`load_exported`).

    Args:
      sub: the sub-network.
      *sample_args: inputs of the right shape beyond the batch axis (arrays or
        ``jax.ShapeDtypeStruct``).
      path: file to write, optional.
      variables: default ``sub.variables``.
      batch_dim: name of the symbolic batch dimension.
      platforms: lowering platforms (default: the current backend), e.g. ``("cpu", "cuda")``.
      **kwargs: keyword arguments of the sub-network (e.g. ``train=False``).
    """
    if not sample_args:
        raise SurgeryError("export_subnetwork needs a sample input (its batch size is ignored)")
    variables = sub.variables if variables is None else variables
    (batch,) = jax.export.symbolic_shape(batch_dim)
    specs = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct((batch, *np.shape(a)[1:]), jnp.result_type(a)),
        sample_args)
    var_specs = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(np.shape(a), getattr(a, "dtype", None)
                                       or jnp.result_type(a)), variables)

    def run(v, *args):
        return sub.apply(v, *args, **kwargs)

    def run_per_example(v, *args):
        def one(*example):
            batch_of_one = jax.tree_util.tree_map(lambda a: a[None], example)
            return jax.tree_util.tree_map(lambda a: a[0], sub.apply(v, *batch_of_one, **kwargs))

        return jax.vmap(one)(*args)

    try:
        exp = jax.export.export(jax.jit(run), platforms=platforms)(var_specs, *specs)
    except SurgeryError:
        # the model's program changes with a symbolic batch size (e.g. ``x[:, 0]`` becomes a
        # gather): run the batch-size-1 program over the examples instead
        exp = jax.export.export(jax.jit(run_per_example), platforms=platforms)(var_specs,
                                                                                *specs)
    result = ExportedSubNetwork(exp, variables)
    if path is not None:
        from flax import serialization

        host = jax.tree_util.tree_map(
            lambda a: np.asarray(jax.random.key_data(a) if _is_key(a) else a), variables)
        blob = serialization.msgpack_serialize({
            "exported": bytes(exp.serialize()),
            # readable without this library (dicts as they are, other nodes as dicts) ...
            "variables": serialization.to_state_dict(host),
            # ... and exactly, leaf by leaf, for load_exported (any pytree, PRNG keys)
            "leaves": {str(k): x for k, x in enumerate(jax.tree_util.tree_leaves(host))},
        })
        Path(path).write_bytes(blob)
    return result


def load_exported(path: str | os.PathLike) -> ExportedSubNetwork:
    """Reads a file written by ``export_subnetwork(..., path=...)``; needs no model code."""
    from flax import serialization

    data = serialization.msgpack_restore(Path(path).read_bytes())
    exp = jax.export.deserialize(bytearray(data["exported"]))
    tree = exp.in_tree.children()[0].children()[0]  # ((variables, *args), kwargs)
    leaves = []
    for k, aval in enumerate(exp.in_avals[:tree.num_leaves]):
        x = jnp.asarray(data["leaves"][str(k)])
        leaves.append(jax.random.wrap_key_data(x, impl=aval.dtype._impl)
                      if jax.dtypes.issubdtype(aval.dtype, jax.dtypes.prng_key) else x)
    return ExportedSubNetwork(exp, jax.tree_util.tree_unflatten(tree, leaves))
