"""``cdeq run TASK``: every stage in order, then the evaluation grid, ``table.json``/``table.md``
and the figures."""
from __future__ import annotations

import contextlib
from typing import Any

from cdeq import distributed
from cdeq.lock import RunLock
from cdeq.measure import LATENCY_RATIO, device_name
from cdeq.pipeline.evaluate import (PerBudget, TeacherSolver, WarmStarted, converged_teacher, evaluate_grid,
                                    evaluate_rows, latency, nfe_to_tolerance)
from cdeq.pipeline.settings import PipelineConfig
from cdeq.pipeline.stages import Run, param_count


def trained(model: Any) -> int:
    """Parameters a student trains (its frozen teacher copy not counted)."""
    return sum(p.numel() for p in model.trainable_parameters())


def writer_lock(out: str) -> contextlib.AbstractContextManager:
    """The run directory's lock (:class:`~cdeq.lock.RunLock`), taken by the main rank before any stage:
    a second writer fails at once naming the holder, and an unwritable directory fails here."""
    return RunLock(out) if distributed.is_main() else contextlib.nullcontext()


def run_pipeline(config: PipelineConfig, figures: bool = True) -> dict[str, Any]:
    """Run (or resume) every stage of ``config`` and write the table and figures; returns the table.
    Under torchrun every rank runs every stage on its share of the data; the main rank writes."""
    with writer_lock(config.out):
        return _run_pipeline(config, figures)


def _run_pipeline(config: PipelineConfig, figures: bool) -> dict[str, Any]:
    from cdeq.report import markdown_table, write_report

    run = Run(config)
    s = run.s
    distributed.print0(f"cdeq run {config.task}: preset {config.preset}, device {config.device}, seed {config.seed}, "
          f"run dir {run.run_dir}", flush=True)
    run.train_teacher()
    run.train_explicit()
    run.sample()
    cdeq_student, _ = run.distill("anderson")
    cdeq_student.fused = s["fused_inference"]
    plain_student, _ = run.distill("plain")
    hyper, _ = run.train_hyperdeq()
    directs = {j: run.train_direct(j)[0] for j in s["nfe"]}
    explicit = run.explicit()

    distributed.print0("[evaluate] test split", flush=True)
    teacher, nfes = run.teacher(), list(s["nfe"])
    teacher_nfes = sorted(set(nfes) | set(s["teacher_nfe"]))
    past = sorted(set(nfes) | set(s["extra_nfe"]))  # the learned methods past the budgets they trained for
    methods = {
        "teacher-anderson": (TeacherSolver(teacher, "anderson", m=s["anderson_m"]), teacher_nfes, param_count(teacher)),
        "teacher-fixed-point": (TeacherSolver(teacher, "fixed_point"), teacher_nfes, param_count(teacher)),
        "hyperdeq": (hyper, past, param_count(hyper)),
        "cdeq": (cdeq_student, past, trained(cdeq_student)),
        "cdeq+anderson": (WarmStarted(cdeq_student, m=s["anderson_m"]), past, trained(cdeq_student)),
        "cdeq-plain": (plain_student, past, trained(plain_student)),
        "direct": (PerBudget(directs), nfes, trained(directs[nfes[0]])),
    }
    cache = run.eval_rows()  # a killed evaluation resumes at its first unfinished row
    rows = evaluate_grid(run, methods, cache)
    rows.append(cache.row("explicit", lambda: evaluate_rows(run, "explicit", None, [None], param_count(explicit),
                                                            logits=explicit)[0]))
    table = {
        "task": config.task, "command": config.command, "device": device_name(run.device), "commit": run.commit,
        "seed": config.seed, "preset": config.preset,
        "teacher_converged": cache.row("teacher-converged", lambda: converged_teacher(run)),
        "metric": run.task.metric, "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()},
        "latency": latency(run, cdeq_student, nfes) if distributed.is_main() else None,
        "latency_ratio": LATENCY_RATIO,
        "stage_commits": run.stage_commits(),
        "rows": rows,
        "to_tolerance": cache.row("to-tolerance", lambda: nfe_to_tolerance(run, cdeq_student)),
    }
    if distributed.is_main():
        write_report(run.run_dir, table, figures=figures)
        print(markdown_table(table), flush=True)
    return table
