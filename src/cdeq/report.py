"""The paper-style table (C-DEQ Tables 1-3) and figures (Figures 2-3) of one pipeline run.

``table.json`` is the source of truth; ``table.md`` and the PNG figures are rebuilt from it by
:func:`write_report` (``cdeq report RUN_DIR``). Its form is binding (tools outside this repository
read it): top-level ``task``, ``command``, ``device``, ``commit``, ``seed``, ``teacher_converged``
({``nfe``, ``value``}), ``metric`` and ``rows``, a list of {``method``, ``nfe``, ``value``,
``rel_residual``, ``time_ms``, ``params``} (plus ``peak_mem_mb``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cdeq.io import atomic_write_bytes, atomic_write_json, atomic_write_text

METHODS = ("teacher-anderson", "teacher-fixed-point", "hyperdeq", "cdeq", "cdeq+anderson", "cdeq-plain", "direct",
           "explicit")
REQUIRED_KEYS = ("task", "command", "device", "commit", "seed", "teacher_converged", "metric", "rows")
ROW_KEYS = ("method", "nfe", "value", "rel_residual", "time_ms", "params")


def validate_table(table: dict[str, Any]) -> None:
    """Raise ValueError unless ``table`` has the binding form of ``table.json``."""
    missing = [k for k in REQUIRED_KEYS if k not in table]
    if missing:
        raise ValueError(f"table: missing top-level keys {missing}")
    if table["metric"] not in ("accuracy", "perplexity"):
        raise ValueError(f"table['metric']: expected 'accuracy' or 'perplexity', got {table['metric']!r}")
    if set(table["teacher_converged"]) < {"nfe", "value"}:
        raise ValueError("table['teacher_converged']: expected keys 'nfe' and 'value'")
    for i, row in enumerate(table["rows"]):
        absent = [k for k in ROW_KEYS if k not in row]
        if absent:
            raise ValueError(f"table['rows'][{i}]: missing keys {absent}")
        if row["method"] not in METHODS:
            raise ValueError(f"table['rows'][{i}]['method']: expected one of {METHODS}, got {row['method']!r}")
        if (row["method"] == "explicit") != (row["nfe"] is None):
            raise ValueError(f"table['rows'][{i}]: explicit rows (and only they) have nfe null")


def fmt_or_dash(value: Any, spec: str) -> str:
    """``value`` formatted by ``spec``, or a dash for a missing one (None)."""
    return "–" if value is None else format(value, spec)


def markdown_table(table: dict[str, Any]) -> str:
    """The table as markdown, rows grouped by NFE like the paper's Tables 1-3."""
    acc = table["metric"] == "accuracy"
    metric = "Test acc. (%) ↑" if acc else "Test PPL ↓"
    tc = table["teacher_converged"]
    lines = [
        f"## {table['task']}: quality against solver steps",
        "",
        f"Converged teacher: {metric.split(' ')[0]} "
        f"{fmt_or_dash(tc['value'] * 100 if acc else tc['value'], '.2f')} at {fmt_or_dash(tc['nfe'], '.1f')} NFE "
        f"(device {table['device']}, seed {table['seed']}, commit {str(table['commit'])[:10]}).",
        "",
        f"| Method | # Params | NFE | {metric} | Rel. residual | Time / batch (ms) | Peak mem (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    def order(row: dict[str, Any]) -> tuple:
        return (-1 if row["nfe"] is None else row["nfe"], METHODS.index(row["method"]))
    for row in sorted(table["rows"], key=order):
        value = row["value"] * 100 if acc else row["value"]
        lines.append(
            f"| {row['method']} | {row['params'] / 1e3:.1f}K | {fmt_or_dash(row['nfe'], 'd')} | {value:.2f} | "
            f"{fmt_or_dash(row['rel_residual'], '.2e')} | {fmt_or_dash(row['time_ms'], '.2f')} | {fmt_or_dash(row.get('peak_mem_mb'), '.1f')} |"
        )
    latency = table.get("latency")
    if latency:
        how = table.get("latency_ratio", "ratio of medians")
        lines += ["", "C-DEQ at NFE=k against the injection, k bare teacher-layer calls and the readout (same "
                  f"batch, timed alternately; median times over rounds, {how}): "
                  + ", ".join(f"k={k}: {v['cdeq_ms']:.2f} / {v['bare_ms']:.2f} ms, {v['ratio']:.2f}x"
                              for k, v in latency.items()) + "."]
    elif table.get("bare_layer_time_ms"):  # tables written before the interleaved measurement
        lines += ["", "Time of the injection, k bare teacher-layer calls and the readout (same batch): "
                  + ", ".join(f"k={k}: {v:.2f} ms" for k, v in table["bare_layer_time_ms"].items()) + "."]
    if table.get("to_tolerance"):
        lines += ["", "Mean NFE per test sample to reach a relative residual under the teacher's f, each "
                  "sample stopped on its own (the student's step included; mean over the samples that reached "
                  "it within 50 calls):", "", "| Method | tol | NFE | reached |", "|---|---:|---:|---:|"]
        lines += [f"| {r['method']} | {r['tol']:.0e} | {fmt_or_dash(r['nfe'], '.2f')} | {r['reached'] * 100:.1f}% |"
                  for r in table["to_tolerance"]]
    lines += ["", f"Command: `{table['command']}`", ""]
    return "\n".join(lines)


def _series(table: dict[str, Any], method: str, key: str) -> tuple[list, list]:
    rows = sorted((r for r in table["rows"] if r["method"] == method and r["nfe"] is not None), key=lambda r: r["nfe"])
    return [r["nfe"] if key != "time_ms" else r["time_ms"] for r in rows], [r["value"] if key != "rel_residual" else r["rel_residual"] for r in rows]


def _panel(plt: Any, table: dict[str, Any], key: str, xlabel: str, ylabel: str, group: list[str],
           with_refs: bool) -> Any:
    """One figure: the rows' ``key`` against NFE (or wall time) for each method of ``group``."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for m in group:
        xs, ys = _series(table, m, key)
        if key == "rel_residual":
            xs, _ = _series(table, m, "nfe")
            pairs = [(x, y) for x, y in zip(xs, ys) if y is not None]
            xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
        if xs:
            ax.plot(xs, ys, marker="o", label=m)
    if with_refs:
        ax.axhline(table["teacher_converged"]["value"], ls=":", c="k", label="converged teacher")
        for r in table["rows"]:
            if r["method"] == "explicit":
                ax.axhline(r["value"], ls="--", c="grey", label="explicit")
    ax.set_xscale("log", base=2) if key != "time_ms" else ax.set_xscale("log")
    if key == "rel_residual" or table["metric"] == "perplexity":
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{table['task']} ({table['device']})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def write_figures(table: dict[str, Any], out_dir: Path) -> list[Path]:
    """Quality and residual against NFE (Figure 2), quality against wall time, and the Anderson
    ablation (Figure 3), as PNG files in ``out_dir``."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if m != "explicit" and any(r["method"] == m for r in table["rows"])]
    ylabel = "test accuracy" if table["metric"] == "accuracy" else "test perplexity"
    panels = [
        ("quality_vs_nfe.png", "nfe", "NFE", ylabel, methods, True),
        ("residual_vs_nfe.png", "rel_residual", "NFE", "relative residual ||f(z)-z||/||f(z)||", methods, False),
        ("quality_vs_time.png", "time_ms", "inference time per batch (ms)", ylabel, methods, True),
        ("anderson_ablation.png", "nfe", "NFE", ylabel, [m for m in ("teacher-anderson", "cdeq-plain", "cdeq") if m in methods], True),
    ]
    written = []
    for name, *panel in panels:
        fig = _panel(plt, table, *panel)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(out_dir / name, buf.getvalue())
        written.append(out_dir / name)
    return written


def write_report(run_dir: str | Path, table: dict[str, Any] | None = None, figures: bool = True) -> dict[str, Any]:
    """Write ``table.json`` (when given), then rebuild ``table.md`` and the figures from it."""
    run_dir = Path(run_dir)
    if table is not None:
        validate_table(table)
        atomic_write_json(run_dir / "table.json", table)
    path = run_dir / "table.json"
    if not path.exists():
        raise FileNotFoundError(f"run_dir: no table.json in {run_dir} (run `cdeq run TASK --out {run_dir}` first)")
    table = json.loads(path.read_text())
    validate_table(table)
    atomic_write_text(run_dir / "table.md", markdown_table(table))
    if figures:
        write_figures(table, run_dir)
    return table
