"""asgssd-jax: automated search-space generation, H2SPG and sub-network construction in JAX."""

from asgssd_jax.cost import count_macs, count_params
from asgssd_jax.export import (
    ExportedSubNetwork,
    export_subnetwork,
    load_exported,
    load_subnetwork,
    save_subnetwork,
)
from asgssd_jax.optim import (
    H2SPGInfo,
    H2SPGState,
    SparsityWarning,
    cost_aware_saliency,
    dhspg,
    dhspg_saliency,
    h2spg,
    h2spg_info,
    magnitude_saliency,
    proxsg_plus,
    taylor_saliency,
)
from asgssd_jax.search_space import Group, SearchSpace, generate_search_space
from asgssd_jax.segments import Segment, SegmentGraph, build_segment_graph
from asgssd_jax.surgery import (
    NNXSubNetwork,
    SubNetwork,
    SurgeryError,
    construct_subnetwork,
    relative_difference,
)
from asgssd_jax.trace import TraceError, TraceGraph, trace, trace_program

__version__ = "0.1.0"

__all__ = [
    "ExportedSubNetwork",
    "Group",
    "H2SPGInfo",
    "H2SPGState",
    "NNXSubNetwork",
    "SearchSpace",
    "Segment",
    "SegmentGraph",
    "SparsityWarning",
    "SubNetwork",
    "SurgeryError",
    "TraceError",
    "TraceGraph",
    "build_segment_graph",
    "construct_subnetwork",
    "relative_difference",
    "cost_aware_saliency",
    "count_macs",
    "count_params",
    "dhspg",
    "dhspg_saliency",
    "export_subnetwork",
    "generate_search_space",
    "h2spg",
    "h2spg_info",
    "load_exported",
    "load_subnetwork",
    "magnitude_saliency",
    "proxsg_plus",
    "save_subnetwork",
    "taylor_saliency",
    "trace",
    "trace_program",
]
