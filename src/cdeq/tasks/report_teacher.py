"""How well a trained teacher's equilibrium is solved, and what a truncated solve costs in accuracy.

:func:`teacher_report` measures, on a split:

- the teacher's metric through its own :class:`cdeq.DEQ` in eval mode (its working budget
  ``eval_max_iter`` and tolerance ``f_tol``), with the forward solver's NFE, the per-sample steps
  to tolerance, the relative residual ``||f(z) - z|| / ||f(z)||`` of the returned state and the
  fraction of samples that met the tolerance;
- the metric when the state is its solver's k-th iterate, ``readout(solve(f, z0, max_iter=k,
  tol=0))``, for k in ``budgets`` (1, 2, 4, 8), with Anderson (its own options) and with plain
  fixed-point iteration, and the mean relative residual there.

Command line (writes ``OUT/TASK.json`` and ``OUT/TASK.md``)::

    python -m cdeq.tasks.report_teacher TASK RUN_DIR [--explicit-run DIR] [--out results/teachers]
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from cdeq.io import atomic_write_json, atomic_write_text
from cdeq.models import DEQModel, num_parameters
from cdeq.tasks.base import Task
from cdeq.training import METRICS

BUDGETS = (1, 2, 4, 8)
TARGETS: dict[str, dict[str, Any]] = {
    "cora": {"accuracy": 0.80}, "citeseer": {"accuracy": 0.69},
    "fashion-mnist": {"accuracy": 0.90}, "mnist": {"accuracy": 0.99},
    "gutenberg": {"perplexity_vs_explicit": 1.05}, "wikitext-2": {"perplexity_vs_explicit": 1.05},
}


def teacher_report(task: Task, model: DEQModel, split: str = "test", budgets: Sequence[int] = BUDGETS,
                   limit: Optional[int] = None, batch_size: Optional[int] = None) -> dict[str, Any]:
    """Convergence and truncated-solve figures of ``model`` (a trained teacher) on ``split``."""
    from cdeq.norm import reset_norm

    model.eval()
    reset_norm(model)
    cfg = model.deq.config
    stats = {"nfe": [], "steps": [], "rel": [], "conv": []}

    def own(x: Any) -> torch.Tensor:
        u = model.inject(x)
        z, info = model.deq(lambda s: model.layer(s, u), model.init_state(u))
        stats["nfe"].append(float(info.nfe))
        stats["steps"] += info.steps.float().tolist()
        stats["rel"] += info.rel_residual.float().tolist()
        stats["conv"] += info.converged.float().tolist()
        return model.readout(z)

    t0 = time.time()
    full = task.evaluate(own, split, batch_size=batch_size, limit=limit)
    rel = torch.tensor(stats["rel"])
    report: dict[str, Any] = {
        task.metric: full,
        "working_budget": {"solver": cfg.f_solver or "anderson", "max_iter": cfg.eval_max_iter or cfg.f_max_iter,
                           "tol": cfg.f_tol, "backward": cfg.backward,
                           "phantom_steps": cfg.phantom_steps if cfg.backward == "phantom" else 0},
        "nfe_mean": sum(stats["nfe"]) / len(stats["nfe"]),
        "steps_to_tol_mean": sum(stats["steps"]) / len(stats["steps"]),
        "rel_residual_mean": float(rel.mean()), "rel_residual_median": float(rel.median()),
        "rel_residual_max": float(rel.max()), "converged_fraction": sum(stats["conv"]) / len(stats["conv"]),
        "seconds": round(time.time() - t0, 1),
    }
    for solver, options in (("anderson", dict(cfg.f_options)), ("fixed_point", {})):
        rows = {}
        for k in budgets:
            residuals: list[float] = []

            def truncated(x: Any) -> torch.Tensor:
                z, info = model.truncated_solve(x, k, solver, **options)
                residuals.extend(info.rel_residual.float().tolist())
                return model.readout(z)

            value = task.evaluate(truncated, split, batch_size=batch_size, limit=limit)
            rows[str(k)] = {task.metric: value, "rel_residual_mean": sum(residuals) / len(residuals)}
        report[solver] = rows
    return report


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _device() -> str:
    return f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}" \
        if not torch.cuda.is_available() else torch.cuda.get_device_name()


def _verdict(name: str, metric: str, value: float, explicit: Optional[float]) -> dict[str, Any]:
    target = TARGETS.get(name, {})
    if metric in target:
        return {"target": f">= {target[metric]}", "met": value >= target[metric]}
    if "perplexity_vs_explicit" in target:
        ratio = target["perplexity_vs_explicit"]
        if explicit is None:
            return {"target": f"<= {ratio} x explicit perplexity", "met": None}
        return {"target": f"<= {ratio} x explicit perplexity ({ratio * explicit:.2f})", "met": value <= ratio * explicit,
                "ratio": value / explicit}
    return {}


def _markdown(rec: dict[str, Any]) -> str:
    m, rep = rec["metric"], rec["report"]
    fmt = (lambda v: f"{100 * v:.2f}%") if m == "accuracy" else (lambda v: f"{v:.2f}")
    lines = [f"# Teacher: {rec['task']}", "",
             f"- model: {rec['model']} ({rec['params']:,} parameters), preset `{rec['preset']}`, seed {rec['seed']}",
             f"- test {m}: **{fmt(rep[m])}** (target {rec['verdict'].get('target', '-')}: "
             f"{'met' if rec['verdict'].get('met') else 'NOT met' if rec['verdict'].get('met') is False else 'n/a'})",
             ]
    if rec.get("explicit"):
        e = rec["explicit"]
        lines.append(f"- explicit baseline {e['model']} ({e['params']:,} parameters): test {m} {fmt(e[m])}")
    wb = rep["working_budget"]
    phantom = f" (+ {wb['phantom_steps']} phantom steps after the solve)" if wb["phantom_steps"] else ""
    lines += [f"- working budget: {wb['solver']}, max_iter {wb['max_iter']}, tol {wb['tol']:g}, backward "
              f"{wb['backward']}{phantom}",
              f"- NFE (forward solve, mean per batch) {rep['nfe_mean']:.1f}; steps to tol (mean per sample) "
              f"{rep['steps_to_tol_mean']:.1f}; relative residual mean {rep['rel_residual_mean']:.2e}, "
              f"median {rep['rel_residual_median']:.2e}, max {rep['rel_residual_max']:.2e}; converged "
              f"{100 * rep['converged_fraction']:.1f}%",
              f"- training: {rec['training']['steps']} steps, {rec['training']['wall_s']:.0f} s: "
              f"`{rec['train_command']}`",
              "", "Truncated solves: the readout of the solver's k-th iterate from z0 = 0 (no phantom steps).",
              "", f"| solver budget | Anderson {m} | Anderson rel. res. | fixed-point {m} | fixed-point rel. res. |",
              "|---|---|---|---|---|"]
    for k in rep["anderson"]:
        a, f = rep["anderson"][k], rep["fixed_point"][k]
        lines.append(f"| {k} | {fmt(a[m])} | {a['rel_residual_mean']:.2e} | {fmt(f[m])} | {f['rel_residual_mean']:.2e} |")
    lines += ["", f"Report command: `{rec['command']}`", f"Device: {rec['device']}; commit {rec['commit']}", ""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cdeq.tasks.report_teacher", description=__doc__.split("\n")[0])
    parser.add_argument("task")
    parser.add_argument("run_dir", help="the teacher's run folder (from Task.train_teacher)")
    parser.add_argument("--explicit-run", help="the explicit baseline's run folder (its metrics.json)")
    parser.add_argument("--out", default="results/teachers", help="folder for TASK.json and TASK.md")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="evaluate on at most this many batches")
    args = parser.parse_args(argv)
    from cdeq import tasks
    from cdeq.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    task = tasks.get(args.task)
    model = task.load_teacher(args.run_dir)
    train = json.loads((Path(args.run_dir) / METRICS).read_text())
    rep = teacher_report(task, model, split=args.split, limit=args.limit)
    explicit = None
    if args.explicit_run:
        em = json.loads((Path(args.explicit_run) / METRICS).read_text())
        explicit = {"model": em["meta"].get("model", "explicit"), "params": em["meta"]["params"],
                    task.metric: em["test"][task.metric], "steps": em["steps"], "wall_s": em["wall_s"]}
    meta = train["meta"]
    rec = {"task": args.task, "metric": task.metric, "model": type(model).__name__, "params": num_parameters(model),
           "preset": meta["preset"], "seed": meta["seed"], "recipe": meta["recipe"],
           "training": {"steps": train["steps"], "wall_s": train["wall_s"], "best": train["best"],
                        "test_at_training_end": train["test"]},
           "report": rep, "explicit": explicit,
           "verdict": _verdict(args.task, task.metric, rep[task.metric], explicit and explicit[task.metric]),
           "train_command": meta.get("command", "-"),
           "command": "python -m cdeq.tasks.report_teacher " + " ".join(sys.argv[1:] if argv is None else argv),
           "device": _device(), "commit": _git_commit()}
    out = Path(args.out)
    atomic_write_json(out / f"{args.task}.json", rec)
    atomic_write_text(out / f"{args.task}.md", _markdown(rec))
    print(_markdown(rec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
