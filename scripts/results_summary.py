"""Print the README's results summary from results/*/table.json (the figures are never typed by hand).

Runs in ``results/<task>/`` get their full table, the retention and latency figures and a line
that sets C-DEQ against each comparison of the pipeline issue NFE by NFE; the comparison runs beside them
(``<task>-long``: 4x the distillation, HyperDEQ and direct steps; ``<task>-rw1``: the rollout term
weighted 1 instead of 10; ``<task>-zeros``: also the paper's z_0 = 0 for the students;
``<task>-mlp``: a two-layer learned z_0, rollout weight 1) get one line per method that differs
from the main run; ``<task>-seedN`` repeats of the main command with ``--seed N`` get one line of
means and standard deviations over all seeds, and so do ``<task>-dseedN``, repeats that load the
main run's teacher and explicit baseline and take ``--seed N`` for everything after them.

Usage: python scripts/results_summary.py
"""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1] / "results"
METHODS = ("teacher-anderson", "hyperdeq", "direct", "cdeq-plain", "cdeq")
VARIANTS = ("-rw1", "-zeros", "-long", "-mlp")
SEED_RUNS = {  # suffix -> what the repeats share with the main run
    "-seed": "runs of the same command",
    "-dseed": "runs with the main run's teacher and explicit baseline; the trajectories, students and baselines with --seed N",
}
SEED_RUN = re.compile(r"-d?seed\d+$")


def load(path: Path) -> tuple[dict, dict, Callable[[float], str], list[int]]:
    t = json.loads(path.read_text())
    fmt = (lambda v: f"{v * 100:.1f}") if t["metric"] == "accuracy" else (lambda v: f"{v:.1f}")
    nfes = sorted({r["nfe"] for r in t["rows"] if r["method"] == "cdeq"})
    value = {(r["method"], r["nfe"]): r["value"] for r in t["rows"]}
    return t, value, fmt, nfes


def header(t: dict, name: str, fmt: Callable[[float], str], value: dict) -> str:
    acc = t["metric"] == "accuracy"
    explicit = next(v for (m, _), v in value.items() if m == "explicit")
    tc = t["teacher_converged"]
    settings = t.get("settings", {})
    init = settings.get("student_init", "zeros")  # runs before these settings: zeros, 1, 0
    rollout_weight, anchor_weight = settings.get("rollout_weight", 1.0), settings.get("anchor_weight", 0.0)
    return (f"**{t['task']}**, preset {t.get('preset', '?')}, student z_0 {init}, rollout weight {rollout_weight:g}, "
            f"anchor weight {anchor_weight:g} "
            f"({'accuracy %' if acc else 'perplexity'}; converged teacher {fmt(tc['value'])} at {tc['nfe']:.1f} NFE, "
            f"explicit {fmt(explicit)}; {t['device']}, seed {t['seed']}, commit {t['commit'][:10]}; "
            f"[table](results/{name}/table.md))")


def main_run(path: Path) -> None:
    t, value, fmt, nfes = load(path)
    acc = t["metric"] == "accuracy"
    print(header(t, path.parent.name, fmt, value) + "\n")
    print("| method | " + " | ".join(f"NFE {k}" for k in nfes) + " |")
    print("|---|" + "---:|" * len(nfes))
    for m in METHODS:
        print(f"| {m} | " + " | ".join(fmt(value[(m, k)]) if (m, k) in value else "–" for k in nfes) + " |")
    tc = t["teacher_converged"]
    ratios = {k: value[("cdeq", k)] / tc["value"] for k in nfes}
    what = "of the converged teacher's accuracy" if acc else "x the converged teacher's perplexity"
    print("\nC-DEQ: " + ", ".join(f"NFE {k}: {r * 100:.1f}%" if acc else f"NFE {k}: {r:.3f}"
                                 for k, r in ratios.items()) + f" {what}.")
    if t.get("latency"):
        print("C-DEQ time / (injection + k bare layer calls + readout), timed alternately: "
              + ", ".join(f"NFE {k}: {v['ratio']:.2f}x" for k, v in t["latency"].items()) + ".")
    print(target_line(t, value, nfes))
    for variant in VARIANTS:
        other = path.parent.parent / (path.parent.name + variant) / "table.json"
        if other.exists():
            variant_lines(other, value)
    for suffix, what in SEED_RUNS.items():
        seeds = sorted(path.parent.parent.glob(f"{path.parent.name}{suffix}[0-9]*/table.json"))
        if seeds:
            seed_line([path, *seeds], nfes, what)
    print()


def seed_line(paths: list[Path], nfes: list[int], what: str) -> None:
    """Mean and standard deviation over the main run and its repeats with other seeds (``what``
    says what they share), and of C-DEQ's margin over HyperDEQ and the plain ablation (positive =
    C-DEQ better)."""
    runs = [load(p) for p in paths]
    acc = runs[0][0]["metric"] == "accuracy"
    scale, sign = (100.0, 1.0) if acc else (1.0, -1.0)
    seeds = ", ".join(str(r[0]["seed"]) for r in runs)

    def stat(xs: list[float]) -> str:
        return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"
    cells = []
    for m in ("hyperdeq", "cdeq-plain", "cdeq"):
        cells.append(f"{m} " + " / ".join(stat([r[1][(m, k)] * scale for r in runs]) for k in nfes))
    for other in ("hyperdeq", "cdeq-plain"):
        cells.append(f"cdeq − {other} " + " / ".join(
            stat([sign * (r[1][("cdeq", k)] - r[1][(other, k)]) * scale for r in runs]) for k in nfes))
    print(f"- seeds {seeds} ({len(runs)} {what}; mean ± sd, NFE "
          + " / ".join(map(str, nfes)) + "): " + "; ".join(cells))


def target_line(t: dict, value: dict, nfes: list[int]) -> str:
    """C-DEQ against each comparison of the pipeline issue, NFE by NFE (ahead / level / behind)."""
    acc = t["metric"] == "accuracy"
    show = (lambda v: f"{v * 100:.2f}") if acc else (lambda v: f"{v:.2f}")

    def versus(other: str, ks: list[int], label: str = "") -> str:
        ks = [k for k in ks if (other, k) in value]
        mine = {k: value[("cdeq", k)] for k in ks}
        ahead = [k for k in ks if (mine[k] > value[(other, k)]) == acc and mine[k] != value[(other, k)]]
        level = [k for k in ks if mine[k] == value[(other, k)]]
        behind = [f"{k} ({show(mine[k])} vs {show(value[(other, k)])})" for k in ks if k not in ahead + level]
        return f"{other}{label} " + "; ".join(f"{word} at NFE {', '.join(map(str, cells))}" for word, cells in
                                              (("ahead", ahead), ("level", level), ("behind", behind)) if cells)
    cdeq = [value[("cdeq", k)] for k in nfes]
    falls = [f"{a}->{b}" for a, b, va, vb in zip(nfes, nfes[1:], cdeq, cdeq[1:]) if (vb < va) == acc and va != vb]
    parts = [versus(m, nfes) for m in ("teacher-anderson", "hyperdeq", "direct")]
    parts.append(versus("cdeq-plain", [k for k in nfes if k >= 2], " (NFE >= 2)"))
    parts.append("quality rises or holds with NFE" if not falls else f"quality falls at NFE {', '.join(falls)}")
    if t.get("latency"):
        slow = [k for k, v in t["latency"].items() if v["ratio"] > 1.15]
        parts.append("latency <= 1.15x " + ("at every NFE" if not slow else f"missed at NFE {', '.join(slow)}"))
    return "Targets, C-DEQ against " + " · ".join(parts) + "."


def variant_lines(path: Path, main_value: dict) -> None:
    t, value, fmt, nfes = load(path)
    print(f"- {header(t, path.parent.name, fmt, value)}: "
          + "; ".join(f"{m} " + " / ".join(fmt(value[(m, k)]) for k in nfes)
                      for m in ("hyperdeq", "direct", "cdeq-plain", "cdeq")
                      if any(value.get((m, k)) != main_value.get((m, k)) for k in nfes)) + " (NFE "
          + " / ".join(str(k) for k in nfes) + ")")


def main() -> None:
    for path in sorted(ROOT.glob("*/table.json")):
        if not path.parent.name.endswith(VARIANTS) and not SEED_RUN.search(path.parent.name):
            main_run(path)


if __name__ == "__main__":
    main()
