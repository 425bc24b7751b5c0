"""Optimizers that search and train at once: H2SPG (Algorithm 3) and the ablation baselines."""

from asgssd_jax.optim.baselines import dhspg, proxsg_plus
from asgssd_jax.optim.h2spg import H2SPGInfo, H2SPGState, SparsityWarning, h2spg, h2spg_info
from asgssd_jax.optim.saliency import (
    SaliencyInputs,
    cost_aware_saliency,
    dhspg_saliency,
    magnitude_saliency,
    taylor_saliency,
)
from asgssd_jax.optim.search import (
    SearchGraph,
    hierarchical_search,
    hierarchical_search_callback,
    host_hierarchical_search,
    search_order,
    top_k_search,
)

__all__ = [
    "H2SPGInfo",
    "H2SPGState",
    "SaliencyInputs",
    "SearchGraph",
    "SparsityWarning",
    "cost_aware_saliency",
    "dhspg",
    "dhspg_saliency",
    "h2spg",
    "h2spg_info",
    "hierarchical_search",
    "hierarchical_search_callback",
    "host_hierarchical_search",
    "magnitude_saliency",
    "proxsg_plus",
    "search_order",
    "taylor_saliency",
    "top_k_search",
]
