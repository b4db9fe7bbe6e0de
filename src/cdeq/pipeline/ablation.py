"""``cdeq ablate GRID TASK``: one C-DEQ student per point of a training grid (``lambdas``,
``timemap``) on the run's teacher and trajectories, or an inference grid on the run's student
(``warmstart``, ``adaptive``: :mod:`cdeq.pipeline.inference_study`)."""
from __future__ import annotations

from typing import Any

from cdeq.io import atomic_write_json, atomic_write_text
from cdeq.measure import device_name
from cdeq.pipeline.evaluate import evaluate_rows
from cdeq.pipeline.inference_study import STUDIES
from cdeq.pipeline.run import writer_lock
from cdeq.pipeline.settings import PipelineConfig
from cdeq.pipeline.stages import Run


ABLATIONS: dict[str, dict[str, tuple]] = {
    # C-DEQ Table 4: lambda_global (lambda_1 of Eq. 11) x lambda_task (lambda_2).
    "lambdas": {"lambda_task": (0.0, 0.05), "lambda_global": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)},
    # The time map of Eq. 6 (rho) and the boundary exponent of Eq. 5 (gamma).
    "timemap": {"gamma": (1.0, 2.0, 4.0), "rho": (0.1, 0.25, 0.5, 1.0)},
}
GRIDS = (*ABLATIONS, *STUDIES)


def run_ablation(config: PipelineConfig, grid: str) -> dict[str, Any]:
    """Run ``grid`` and write ``ablation-<grid>.json`` / ``.md``: for a training grid, one C-DEQ
    student per point with the metric at each NFE of the run's grid; for an inference grid, its rows."""
    if grid not in GRIDS:
        raise ValueError(f"grid: expected one of {list(GRIDS)}, got {grid!r}")
    with writer_lock(config.out):
        if grid in STUDIES:
            return _run_study(config, grid)
        return _run_ablation(config, grid)


def _run_study(config: PipelineConfig, grid: str) -> dict[str, Any]:
    run = Run(config)
    results, body = STUDIES[grid](run)
    header = [f"## {config.task}: {grid} study of the C-DEQ student", "",
              f"Device {device_name(run.device)}, seed {config.seed}, commit {run.commit[:10]}.", ""]
    return _write(run, config, grid, results, header + body)


def _write(run: Run, config: PipelineConfig, grid: str, results: list[dict[str, Any]],
           lines: list[str]) -> dict[str, Any]:
    """``ablation-<grid>.json`` (results with their provenance) and ``.md`` in the run directory."""
    lines = [*lines, "", f"Command: `{config.command}`", ""]
    out = {"task": config.task, "grid": grid, "command": config.command, "device": device_name(run.device),
           "commit": run.commit, "seed": config.seed, "metric": run.task.metric,
           "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in run.s.items()}, "results": results}
    atomic_write_json(run.run_dir / f"ablation-{grid}.json", out)
    atomic_write_text(run.run_dir / f"ablation-{grid}.md", "\n".join(lines))
    print("\n".join(lines), flush=True)
    return out


def _run_ablation(config: PipelineConfig, grid: str) -> dict[str, Any]:
    run = Run(config)
    run.train_teacher()
    run.sample()
    (outer, outer_values), (inner, inner_values) = ABLATIONS[grid].items()
    results = []
    for a in outer_values:
        for b in inner_values:
            student, _ = run.distill("anderson", name=f"ablate-{outer}{a}-{inner}{b}", **{outer: a, inner: b})
            values = {row["nfe"]: row["value"] for row in evaluate_rows(run, "cdeq", student, run.s["nfe"], 0)}
            results.append({outer: a, inner: b, "values": values})
    pct = run.task.metric == "accuracy"
    lines = [f"## {config.task}: C-DEQ ablation over {outer} x {inner}", "",
             f"Test {run.task.metric} of the distilled student at NFE {', '.join(map(str, run.s['nfe']))} "
             f"(device {device_name(run.device)}, seed {config.seed}, commit {run.commit[:10]}).", "",
             f"| {outer} | {inner} | " + " | ".join(f"NFE {k}" for k in run.s["nfe"]) + " |",
             "|---|---|" + "---:|" * len(run.s["nfe"])]
    for r in results:
        cells = " | ".join(f"{r['values'][k] * 100:.2f}" if pct else f"{r['values'][k]:.2f}" for k in run.s["nfe"])
        lines.append(f"| {r[outer]} | {r[inner]} | {cells} |")
    return _write(run, config, grid, results, lines)
