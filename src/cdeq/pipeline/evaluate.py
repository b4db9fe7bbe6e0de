"""The evaluation grid of ``cdeq run``: every compared method answers ``state(x, nfe)``, and one
loop measures each at each budget on the test split: the metric, the relative residual of its
states under the teacher's f, the time per batch and the peak memory. A method whose budgets are
prefixes of one solve (:class:`PrefixMethod`: the teacher's solvers, the warm start) is measured
at all its budgets in one pass, its largest budget's calls instead of their sum."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

from cdeq import distributed
from cdeq.measure import peak_memory_mb, student_latency, time_ms
from cdeq.state import State, batch_norm2, to_device

if TYPE_CHECKING:
    from cdeq.consistency import ConsistencyDEQ
    from cdeq.pipeline.stages import RowCache, Run


class Method(Protocol):
    """What the grid asks of a compared method: its equilibrium estimate after ``nfe`` network calls."""

    def state(self, x: Any, nfe: int) -> State: ...


@runtime_checkable
class PrefixMethod(Method, Protocol):
    """A method whose estimate at budget k is the k-th iterate of one solve, whatever its length:
    ``states(x, budgets)`` gives them all from one solve of the largest budget."""

    def states(self, x: Any, budgets: Sequence[int]) -> list[State]: ...


def _pick(iterates: Sequence[State], indices: Sequence[int], wanted: Sequence[int]) -> list[State]:
    """The iterates a solve kept (``return_states=indices``, in that order) at each of ``wanted``."""
    by_index = dict(zip(indices, iterates))
    return [by_index[i] for i in wanted]


class TeacherSolver:
    """The teacher's own solver as a method: its iterate after ``nfe`` calls of f from z_0, with no
    tolerance (the "DEQ" rows of the C-DEQ paper's tables)."""

    def __init__(self, teacher: nn.Module, solver: str, **options: Any) -> None:
        self.teacher, self.solver, self.options = teacher, solver, options

    def state(self, x: Any, nfe: int) -> State:
        return self.teacher.truncated_solve(x, nfe, self.solver, check_residual=False, **self.options)[0]

    def states(self, x: Any, budgets: Sequence[int]) -> list[State]:
        kept = sorted(set(budgets))
        _, info = self.teacher.truncated_solve(x, kept[-1], self.solver, check_residual=False, return_states=kept,
                                               **self.options)
        return _pick(info.states, kept, budgets)


class WarmStarted:
    """C-DEQ as a warm start (``cdeq+anderson``): one student step, then the teacher's Anderson on the
    teacher's f from the student's state for the rest of the budget (``ConsistencyDEQ.solve``)."""

    def __init__(self, student: "ConsistencyDEQ", **options: Any) -> None:
        self.student, self.options = student, options

    def state(self, x: Any, nfe: int) -> State:
        if nfe == 1:
            return self.student.infer(x, nfe=1)
        return self.student.solve(x, tol=0.0, max_nfe=nfe, warm=1, check_residual=False, **self.options)[0]

    def states(self, x: Any, budgets: Sequence[int]) -> list[State]:
        if max(budgets) == 1:
            return [self.student.infer(x, nfe=1) for _ in budgets]
        kept = sorted({k - 1 for k in budgets})  # the solver's iterate j follows the student's step: NFE j + 1
        _, info = self.student.solve(x, tol=0.0, max_nfe=kept[-1] + 1, warm=1, check_residual=False,
                                     return_states=kept, **self.options)
        return _pick(info.states, kept, [k - 1 for k in budgets])


class PerBudget:
    """One model per budget (the direct baseline is trained for its J): ``state(x, nfe)`` asks the one for ``nfe``."""

    def __init__(self, models: dict[int, Method]) -> None:
        self.models = models

    def state(self, x: Any, nfe: int) -> State:
        return self.models[nfe].state(x, nfe)


def rel_residual(teacher: nn.Module, x: Any, z: State) -> Tensor:
    """Per-sample ||f(z)-z||/||f(z)|| of a state under the teacher's layer."""
    fz = teacher.layer(z, teacher.inject(x))
    diff = tuple(a - b for a, b in zip(fz, z)) if isinstance(z, tuple) else fz - z
    return batch_norm2(diff) / batch_norm2(fz).clamp_min(1e-30)


def evaluate_rows(run: "Run", name: str, method: Optional[Method], budgets: Sequence[Optional[int]], params: int,
                  logits: Optional[Callable[[Any], Tensor]] = None) -> list[dict[str, Any]]:
    """One row per budget, from one pass over the test split: the metric, the mean relative
    residual of the states, and the median time and peak memory of one call at that budget on the
    first test batch. A :class:`PrefixMethod` solves each batch once for all budgets; any other
    method is called per budget. ``method=None`` evaluates ``logits(x)`` (a network with no fixed
    point, the explicit baseline; ``budgets=[None]``). With several ranks the metric and the
    residual's mean are reduced exactly over ranks; the main rank alone times."""
    teacher, s = run.teacher(), run.s
    residuals: list[list[Tensor]] = [[] for _ in budgets]

    def predict(x: Any) -> list[Any]:
        x = to_device(x, run.device)
        if method is None:
            return [logits(x)]
        zs = method.states(x, budgets) if isinstance(method, PrefixMethod) else [method.state(x, k) for k in budgets]
        for acc, z in zip(residuals, zs):
            acc.append(rel_residual(teacher, x, z).float().cpu())
        return zs

    score = None if method is None else (lambda z, y: run.task.state_score(teacher, z, y))
    with torch.no_grad():
        values = run.task.evaluate_each(predict, len(budgets), "test", batch_size=s["eval_batch_size"],
                                        limit=s["eval_limit"], score=score)
        return [_row(run, name, method, nfe, params, logits, value, res) for nfe, value, res in
                zip(budgets, values, residuals)]


def _row(run: "Run", name: str, method: Optional[Method], nfe: Optional[int], params: int,
         logits: Optional[Callable[[Any], Tensor]], value: float, residuals: list[Tensor]) -> dict[str, Any]:
    """A finished row: its timing and memory at budget ``nfe`` (main rank) and its printed line."""
    teacher, ms, mem = run.teacher(), None, None
    if distributed.is_main():
        x0, _ = next(iter(run.task.batches("test", batch_size=run.s["eval_batch_size"], limit=1)))
        x0 = to_device(x0, run.device)
        call = (lambda: teacher.readout(method.state(x0, nfe))) if method is not None else (lambda: logits(x0))
        ms = time_ms(call, run.device, repeats=run.s["time_repeats"])
        mem = peak_memory_mb(call, run.device)
    rel = pooled_mean(residuals) if method is not None else None
    shown = f"{value * 100:.2f}%" if run.task.metric == "accuracy" else f"ppl {value:.2f}"
    distributed.print0(f"  {name:<20} nfe {str(nfe):>4}  {shown:>10}  rel.res {rel if rel is None else f'{rel:.2e}'}  "
                       f"{ms or 0.0:8.2f} ms", flush=True)
    return {"method": name, "nfe": nfe, "value": value, "rel_residual": rel, "time_ms": ms, "params": params,
            "peak_mem_mb": mem}


def pooled_mean(values: list[Tensor]) -> float:
    """The mean of every rank's values together (a sum and a count reduced, not a mean of means)."""
    mine = torch.cat(values).double() if values else torch.zeros(0, dtype=torch.float64)
    total, count = distributed.sum_all([float(mine.sum()), mine.numel()])
    return total / count if count else float("nan")


def evaluate_grid(run: "Run", methods: dict[str, tuple[Method, list[int], int]],
                  rows: Optional["RowCache"] = None) -> list[dict[str, Any]]:
    """Rows of every ``name: (method, budgets, params)`` at each of its budgets, each taken from
    ``rows`` where an earlier run of the same evaluation finished it. A :class:`PrefixMethod`'s
    budgets are computed together (all of them again if one is missing: the pass costs its largest)."""
    out = []
    for name, (method, budgets, params) in methods.items():
        groups = [list(budgets)] if isinstance(method, PrefixMethod) else [[k] for k in budgets]
        for group in groups:
            compute = lambda g=group: evaluate_rows(run, name, method, g, params)  # noqa: E731
            out += compute() if rows is None else rows.group([f"{name}-nfe{k}" for k in group], compute)
    return out


def latency(run: "Run", student: "ConsistencyDEQ", budgets: list[int]) -> dict[str, dict[str, float]]:
    """:func:`~cdeq.measure.student_latency` on the first test batch."""
    x0, _ = next(iter(run.task.batches("test", batch_size=run.s["eval_batch_size"], limit=1)))
    return student_latency(student, run.teacher(), to_device(x0, run.device), budgets, run.device,
                           repeats=3 * run.s["time_repeats"])


TOLERANCES = (1e-3, 1e-5)  # relative residuals of the NFE-to-tolerance table
MAX_NFE = 50  # its solves' budget: a sample not there by then counts as not reached


class Start(NamedTuple):
    """Where an exact solve starts: ``warm`` student steps (0: the teacher's z_0), and whether
    Anderson's window is seeded with the student's last two (z, h(z)) pairs."""

    name: str
    warm: int
    seed_history: bool = False


PIPELINE_STARTS = (Start("teacher-anderson", 0), Start("cdeq+anderson", 1))


def nfe_to_tolerance(run: "Run", student: "ConsistencyDEQ", starts: Sequence[Start] = PIPELINE_STARTS,
                     tols: tuple[float, ...] = TOLERANCES, max_nfe: int = MAX_NFE) -> list[dict[str, Any]]:
    """Mean NFE per test sample to reach each relative residual ``tol`` under the teacher's f, each
    sample stopped on its own, from each of ``starts`` (``ConsistencyDEQ.solve``; the student's
    steps counted): by default the teacher's Anderson from z_0 against ``cdeq+anderson`` (one
    student step first). The mean is over the samples that reached ``tol`` within ``max_nfe``
    calls; ``reached`` is their fraction."""
    rows = []
    for start in starts:
        for tol in tols:
            steps, met = [], []

            def predict(x: Any) -> State:
                z, info = student.solve(to_device(x, run.device), tol=tol, max_nfe=max_nfe, warm=start.warm,
                                        seed_history=start.seed_history, m=run.s["anderson_m"])
                steps.append(info.steps[info.converged].float().cpu())
                met.append(info.converged.float().cpu())
                return z

            with torch.no_grad():
                run.task.evaluate(predict, "test", batch_size=run.s["eval_batch_size"], limit=run.s["eval_limit"],
                                  score=lambda z, y: run.task.state_score(run.teacher(), z, y))
            nfe = pooled_mean(steps)
            row = {"method": start.name, "warm": start.warm, "seed_history": start.seed_history, "tol": tol,
                   "nfe": None if math.isnan(nfe) else nfe, "reached": pooled_mean(met)}
            distributed.print0(f"  {start.name:<24} to {tol:.0e}: {nfe:.2f} NFE, reached {row['reached']:.1%}",
                               flush=True)
            rows.append(row)
    return rows


def converged_teacher(run: "Run") -> dict[str, Any]:
    """The teacher at its working tolerance: its metric and mean NFE."""
    teacher, nfes = run.teacher(), []

    def predict(x: Any) -> Any:
        z, info = teacher.equilibrium(to_device(x, run.device))
        nfes.append(info.steps.float().cpu())
        return z

    with torch.no_grad():
        value = run.task.evaluate(predict, "test", batch_size=run.s["eval_batch_size"], limit=run.s["eval_limit"],
                                  score=lambda z, y: run.task.state_score(teacher, z, y))
    return {"nfe": pooled_mean(nfes), "value": value}
