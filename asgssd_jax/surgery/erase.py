"""Step 3 of Section 3.3: erase unnecessary and isolated vertices.

*Unnecessary* vertices are joints left with one input: ``a + 0``, ``0 + a``, ``a - 0`` become
``a`` and ``0 - a`` becomes ``-a`` (a concat left with one operand is handled with the concat
slicing of step 2). *Isolated* vertices are operations whose results no longer reach an
output: dead-code elimination drops them, and the variables that only they read.
"""

from __future__ import annotations

from asgssd_jax.surgery.plan import SurgeryError
from asgssd_jax.surgery.remove import CONST, DATA, STATIC

__all__ = ["Erasure"]


class Erasure:
    """Bypass of joints and liveness (a mixin of :class:`~.planner.Planner`)."""

    def bypass(self, op) -> None:
        if op.name not in ("add", "add_any", "sub") or len(op.invars) != 2:
            return
        a, b = op.invars
        out = op.outvars[0]
        shape, dtype = self.p.shape(out), self.p.avals[out].dtype

        def fits(x) -> bool:
            return (isinstance(x, int) and self.cls[x] == DATA and self.p.shape(x) == shape
                    and self.p.avals[x].dtype == dtype)

        if self.is_zero(b) and fits(a):
            self.alias[op.index] = (a, False)
        elif self.is_zero(a) and fits(b):
            self.alias[op.index] = (b, op.name == "sub")

    def liveness(self) -> None:
        """The operations whose results reach a kept output (``self.live``)."""
        p, cls = self.p, self.cls
        kept_outputs = []
        for pos, (kind, path) in enumerate(self.output_kinds):
            # state of a leaf the inference mode keeps stays, and so does state this mode alone
            # updates from kept values alone (an rng stream's count); statistics of removed or
            # dead structures go
            x = p.outvars[pos]
            if kind == "state" and self.kept_state is not None and path not in self.kept_state \
                    and (not isinstance(x, int) or cls[x] != STATIC or x in self.leaf_index):
                continue
            kept_outputs.append(pos)
        self.kept_outputs = kept_outputs
        main_data = [pos for pos in kept_outputs if self.output_kinds[pos][0] == "main"
                     and isinstance(p.outvars[pos], int) and cls[p.outvars[pos]] == DATA]
        if not main_data:
            raise SurgeryError(
                "with these groups removed the network's output no longer depends on its input; "
                "remove fewer groups (space.is_valid tells which sets are allowed)")
        live: set[int] = set()
        work: list[int] = []

        def use(x):
            if not isinstance(x, int) or cls[x] == CONST:
                return
            i = p.producer.get(x)
            if i is not None and i not in live:
                live.add(i)
                work.append(i)

        for pos in kept_outputs:
            use(p.outvars[pos])
        while work:
            i = work.pop()
            if i in self.alias:
                use(self.alias[i][0])
                continue
            for x in p.ops[i].invars:
                use(x)
        self.live = live
