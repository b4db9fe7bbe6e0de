"""Inference grids on a run's trained C-DEQ student (``cdeq ablate warmstart|adaptive TASK``): how
far the warm start's saving grows, and the adaptive budget's metric against mean NFE. Both load
the run's cached stages (training any that are missing) and train nothing new."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from cdeq import distributed
from cdeq.pipeline.evaluate import Start, nfe_to_tolerance, pooled_mean
from cdeq.pipeline.stages import Run
from cdeq.report import fmt_or_dash
from cdeq.state import State, to_device

# Warm-start variants (issue 18): more student steps, and Anderson's window seeded with the
# student's last pairs (its h, i.e. the student's steps, as the first Anderson iterates).
WARM_STARTS = (Start("teacher-anderson", 0),
               *(Start(f"warm {w}" + (" + history" if seeded else ""), w, seeded)
                 for w in (1, 2, 3) for seeded in (False, True)))
ADAPTIVE_TOLS = (0.1, 0.03, 0.01, 0.003, 0.001, 0.0003)  # relative change per student step


def _student(run: Run):
    """The run's C-DEQ student (Eq. 7-8 structure), after the stages it needs."""
    run.train_teacher()
    run.sample()
    student, _ = run.distill("anderson")
    return student


def warmstart_study(run: Run) -> tuple[list[dict[str, Any]], list[str]]:
    """Mean NFE to relative residuals 1e-3 / 1e-5 from each of :data:`WARM_STARTS`; each row's
    ``saved`` is the teacher's Anderson from z_0 minus it (the offset the warm start buys)."""
    rows = nfe_to_tolerance(run, _student(run), WARM_STARTS)
    base = {r["tol"]: r["nfe"] for r in rows if r["warm"] == 0}
    for r in rows:
        r["saved"] = None if r["nfe"] is None or base[r["tol"]] is None else base[r["tol"]] - r["nfe"]
    tols = sorted({r["tol"] for r in rows}, reverse=True)
    lines = ["| start | " + " | ".join(f"NFE to {t:.0e} | saved | reached" for t in tols) + " |",
             "|---|" + "---:|---:|---:|" * len(tols)]
    for start in WARM_STARTS:
        cells = []
        for t in tols:
            r = next(r for r in rows if r["method"] == start.name and r["tol"] == t)
            cells += [fmt_or_dash(r["nfe"], ".2f"), fmt_or_dash(r["saved"], "+.2f"), f"{r['reached'] * 100:.1f}%"]
        lines.append(f"| {start.name} | " + " | ".join(cells) + " |")
    intro = ("Mean NFE per test sample (student steps included) to reach a relative residual under the "
             "teacher's f, each sample stopped on its own; `saved` is the teacher's Anderson from z_0 minus "
             "it; mean over the samples that reached the tolerance within 50 calls.")
    return rows, [intro, "", *lines]


def adaptive_study(run: Run) -> tuple[list[dict[str, Any]], list[str]]:
    """The test metric against the mean NFE per sample: fixed budgets 1..J, and
    ``infer(x, nfe=J, tol)`` for each of :data:`ADAPTIVE_TOLS` (J the run's largest budget)."""
    student, budget = _student(run), max(run.s["nfe"])
    rows = [_adaptive_row(run, student, k, None) for k in range(1, budget + 1)]
    rows += [_adaptive_row(run, student, budget, tol) for tol in ADAPTIVE_TOLS]
    shown = (lambda v: f"{v * 100:.2f}") if run.task.metric == "accuracy" else (lambda v: f"{v:.2f}")
    lines = [f"Test {run.task.metric} of `infer(x, nfe=k, tol)`: fixed budgets (tol none), and an adaptive "
             f"budget of at most {budget} calls that stops a sample once a step changes its state by at most "
             "tol (relative).", "", f"| nfe | tol | mean NFE | {run.task.metric} |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['nfe']} | {_fmt_tol(r['tol'])} | {r['mean_nfe']:.2f} | {shown(r['value'])} |" for r in rows]
    return rows, lines


def _adaptive_row(run: Run, student, nfe: int, tol: Optional[float]) -> dict[str, Any]:
    """One point of the curve; a fixed budget (``tol`` None) uses ``nfe`` calls for every sample."""
    used = []

    def predict(x: Any) -> State:
        z = student.infer(to_device(x, run.device), nfe=nfe, tol=tol)
        if tol is not None:
            used.append(student.info.steps.float().cpu())
        return z

    with torch.no_grad():
        value = run.task.evaluate(predict, "test", batch_size=run.s["eval_batch_size"], limit=run.s["eval_limit"],
                                  score=lambda z, y: run.task.state_score(run.teacher(), z, y))
    row = {"nfe": nfe, "tol": tol, "mean_nfe": float(nfe) if tol is None else pooled_mean(used), "value": value}
    distributed.print0(f"  nfe {nfe} tol {tol}: mean NFE {row['mean_nfe']:.2f}, {run.task.metric} {value:.4f}", flush=True)
    return row


def _fmt_tol(tol: Optional[float]) -> str:
    return "none" if tol is None else f"{tol:g}"


STUDIES: dict[str, Callable[[Run], tuple[list[dict[str, Any]], list[str]]]] = {
    "warmstart": warmstart_study,
    "adaptive": adaptive_study,
}
