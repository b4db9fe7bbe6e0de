"""A distilled student as a plain ``nn.Module`` of fixed cost, for ``torch.export`` and ONNX.

:meth:`ConsistencyDEQ.as_module` returns :class:`FixedBudgetStudent`: x -> the teacher's readout of
Algorithm 1's state after exactly ``nfe`` network calls, the step times baked in as constants, no
host synchronisation and no data-dependent control flow, so ``torch.export.export`` traces it to
one graph and ``torch.onnx.export`` to one ONNX model.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

from torch import nn

from cdeq.state import State

if TYPE_CHECKING:
    from cdeq.consistency.student import ConsistencyDEQ


class FixedBudgetStudent(nn.Module):
    """x -> readout (or the state, ``readout=False``) after ``nfe`` steps of Algorithm 1.

    It shares the student's parameters (not a copy); the fused inference step is never used, so
    the module traces to the eager ops of Eq. 5 and 7.
    """

    def __init__(self, student: "ConsistencyDEQ", nfe: int, schedule: Optional[Sequence[float]] = None, *,
                 readout: bool = True) -> None:
        super().__init__()
        if not student.built:
            raise RuntimeError("as_module: the student's W is not built; call student.build(x) (or load a "
                               "checkpoint) first")
        if not isinstance(readout, bool):
            raise ValueError(f"readout: expected True (the teacher's readout) or False (the state), got {readout!r}")
        self.student = student
        self.plan = student._plan(nfe, schedule)
        self.nfe, self.readout = nfe, readout
        self.training = student.training  # the wrapper's own flag, which export reads, follows the student's mode

    def extra_repr(self) -> str:
        return f"nfe={self.nfe}, readout={self.readout}"

    def state(self, x: Any) -> State:
        """Algorithm 1's state after :attr:`nfe` network calls."""
        z = None
        for _, _, z in self.student._steps(x, self.plan, False, None, None, fuse=False):
            pass
        return z

    def forward(self, x: Any) -> Any:
        z = self.state(x)
        return self.student.teacher.readout(z) if self.readout else z
