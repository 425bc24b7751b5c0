"""Taxonomy of jaxpr primitives, shared by tracing, the search space, surgery and cost.

Each set names primitives by ``primitive.name``:

* ``TOLERANT_JOINTS``: joints where a zero operand is the same as an absent operand.
* ``CONTROL_FLOW``: primitives kept as one opaque vertex, never inside a removal structure.
* ``ELEMENTWISE``: per-element operations (operands broadcast, no mixing across positions).
* ``REDUCE`` / ``WINDOW``: reductions over whole axes / over sliding windows.
* ``ZERO_PRESERVING``: an all-zero value in every data operand gives an all-zero result.
* ``ZERO_KILLING``: one all-zero operand gives an all-zero result whatever the others hold
  (barring Inf/NaN in them, which the numerical zero-invariance check catches).
"""

from __future__ import annotations

__all__ = [
    "CONTROL_FLOW",
    "ELEMENTWISE",
    "REDUCE",
    "TOLERANT_JOINTS",
    "WINDOW",
    "ZERO_KILLING",
    "ZERO_PRESERVING",
]

TOLERANT_JOINTS = frozenset({"add", "add_any", "sub", "concatenate"})

CONTROL_FLOW = frozenset({"cond", "while", "scan", "switch", "fori_loop"})

ELEMENTWISE = frozenset(
    """
    add add_any sub mul div max min neg exp exp2 log log1p expm1 tanh logistic abs sqrt rsqrt
    cbrt pow integer_pow square erf erfc erf_inv sign sin cos tan atan2 floor ceil round
    convert_element_type copy copy_p stop_gradient clamp select_n is_finite eq ne gt ge lt le
    and or not xor reduce_precision nextafter rem
    """.split()
)

REDUCE = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
                    "reduce_or", "argmax", "argmin"})

WINDOW = frozenset({"reduce_window_sum", "reduce_window_max", "reduce_window_min",
                    "reduce_window"})

ZERO_PRESERVING = frozenset(
    """
    add add_any sub mul max min neg tanh abs sqrt cbrt integer_pow square erf erf_inv sign sin
    tan floor ceil round convert_element_type copy copy_p stop_gradient reduce_precision
    select_n reshape transpose broadcast_in_dim squeeze expand_dims slice dynamic_slice
    gather rev concatenate reduce_sum reduce_max reduce_min reduce_window_sum reduce_window_max
    reduce_window_min cumsum cummax cummin dot_general conv_general_dilated
    real imag conj dynamic_update_slice pad
    """.split()
)

ZERO_KILLING = frozenset({"mul", "dot_general", "conv_general_dilated"})
