"""asgssd-jax: automated search-space generation, H2SPG and sub-network construction in JAX."""

from asgssd_jax.cost import count_macs, count_params
from asgssd_jax.search_space import Group, SearchSpace, generate_search_space
from asgssd_jax.segments import Segment, SegmentGraph, build_segment_graph
from asgssd_jax.trace import TraceError, TraceGraph, trace, trace_program

__version__ = "0.1.0"

__all__ = [
    "Group",
    "SearchSpace",
    "Segment",
    "SegmentGraph",
    "TraceError",
    "TraceGraph",
    "build_segment_graph",
    "count_macs",
    "count_params",
    "generate_search_space",
    "trace",
    "trace_program",
]
