"""Automated sub-network construction (Section 3.3 of the paper).

``construct_subnetwork(space, variables)`` reads the zero groups from ``variables`` and returns a
:class:`SubNetwork` that computes exactly what the network computes with those groups at zero,
with the removed structures and everything that only served them gone.

The construction is a rewrite of the traced program, planned once per mode (inference,
training) on the program of the sample the space was traced with and expressed per operation
and per variable id, so that it carries over to a re-trace at any other input shape. One plan
type (:mod:`.plan`) holds it; the steps of Section 3.3 are one module each:

1. :mod:`.remove`: remove the vertices of the zero removal structures (constant propagation:
   data times a removed zero is a constant zero).
2. :mod:`.affiliated`: remove what depended on them: concat operands that became constant are
   dropped and their consumers sliced (the columns of K6 in Figure 4), with the constant
   contribution of dropped channels folded into an offset.
3. :mod:`.erase`: erase unnecessary vertices (joints left with one input are bypassed) and
   isolated ones (dead-code elimination).

Constants cut off from every input are folded (:mod:`.fold`), right at every batch size and
0-d included. :mod:`.planner` runs the steps on a traced program, :mod:`.runner` runs a plan on
a re-trace, :mod:`.build` plans every mode. Two thin front-ends share the plan: :mod:`.linen`
(a linen Module that also runs plain functions of any pytree) and :mod:`.nnx_module` (an
``nnx.Module`` with ``.train()`` / ``.eval()`` for a space generated from an NNX module).

The exactness invariant (DESIGN.md) holds by construction: each rewrite is an identity of the
zeroed network, so the sub-network equals it to float rounding (relative 1e-5 in float32; in
16-bit floats the offsets of dropped channels are added inside the float32 accumulation of
their contraction, as the full network adds those channels, so the sub-network stays within
that format's rounding of the zeroed network).

References:
  Section 3.3 and Figure 4 of "Automated search-space generation for sub-network search within
  deep neural networks" (ASGSSD).
"""

from asgssd_jax.surgery.build import construct_subnetwork, relative_difference
from asgssd_jax.surgery.linen import SubNetwork
from asgssd_jax.surgery.nnx_module import NNXSubNetwork
from asgssd_jax.surgery.plan import ModePlan, SubNetworkPlan, SurgeryError

__all__ = ["ModePlan", "NNXSubNetwork", "SubNetwork", "SubNetworkPlan", "SurgeryError",
           "construct_subnetwork", "relative_difference"]
