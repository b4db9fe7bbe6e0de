"""C-DEQ's inference time against the teacher's bare layer calls, per task (see benchmarks/README.md).

For each task: the teacher of the task's preset with its initial weights (time does not depend on
them), the C-DEQ student with the pipeline's default options and the first test batch. The time of
``student.predict`` at NFE k is set against the injection, k bare calls of the teacher's layer and
the readout, alternately (:func:`cdeq.measure.student_latency`, what ``cdeq run`` puts in
``table.json``), so this measures the pipeline's latency target without training anything. The
per-step columns are the differences between the largest and the smallest budget, over their NFE:
the student's step (its call of f', the W projection of Eq. 8, the residual, the Anderson step of
Eq. 7 and the skip of Eq. 5) against one call of the teacher's layer. Each task is measured with
the student's eager step and with its fused one (``ConsistencyDEQ.fused``, what ``cdeq run`` uses
by default); the fused step compiles during the warm-up.

    python benchmarks/student_latency.py --threads 1    # writes results/benchmarks/student-latency-cpu.{json,md}
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

from cdeq import tasks
from cdeq.consistency import ConsistencyDEQ
from cdeq.io import atomic_write_json, atomic_write_text
from cdeq.measure import device_name, git_commit, student_latency
from cdeq.pipeline import DEFAULTS
from cdeq.runtime import tune_cpu_allocator
from cdeq.state import to_device

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.15  # the pipeline issue's bound on C-DEQ's time over the bare layer calls


def measure(task_name: str, preset: str, budgets: list[int], device: torch.device, repeats: int) -> list[dict]:
    """One task's rows, eager and fused C-DEQ steps: times and ratios per budget, per-step costs."""
    task = tasks.get(task_name)
    teacher = task.build_teacher(preset).to(device).eval().requires_grad_(False)
    x, _ = next(iter(task.batches("test", limit=1)))
    x = to_device(x, device)
    student = ConsistencyDEQ(teacher, init=DEFAULTS["student_init"], example=x).to(device).eval()
    rows = []
    for fused in (False, True):
        student.fused = fused
        per_k = student_latency(student, teacher, x, budgets, device, repeats=repeats)
        lo, hi = str(min(budgets)), str(max(budgets))
        steps = max(budgets) - min(budgets)
        step_ms = (per_k[hi]["cdeq_ms"] - per_k[lo]["cdeq_ms"]) / steps
        layer_ms = (per_k[hi]["bare_ms"] - per_k[lo]["bare_ms"]) / steps
        rows.append({"task": task_name, "step": "fused" if student.fused else "eager", "latency": per_k,
                     "step_ms": step_ms, "layer_ms": layer_ms, "step_over_layer": step_ms / layer_ms})
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    budgets = meta["budgets"]
    lines = [f"# C-DEQ time per batch against bare teacher-layer calls ({meta['device']})", "",
             f"`{meta['command']}` — torch {meta['torch']}, commit {meta['commit']}, seed {meta['seed']}, "
             f"preset {meta['preset']}, median of {meta['repeats']} alternating repeats", "",
             "ratio = time of `student.predict(x, k)` / time of injection + k bare teacher-layer calls + readout "
             f"(target <= {TARGET}); per step: the difference between NFE {budgets[-1]} and NFE {budgets[0]} over "
             "their NFE.", "",
             "| task | C-DEQ step | " + " | ".join(f"NFE {k}: C-DEQ ms / bare ms (ratio)" for k in budgets)
             + " | C-DEQ step ms | layer call ms | step / layer |",
             "|---|---|" + "---|" * (len(budgets) + 3)]
    for r in rows:
        cells = [f"{v['cdeq_ms']:.1f} / {v['bare_ms']:.1f} ({v['ratio']:.3f})" for v in (r["latency"][str(k)] for k in budgets)]
        lines.append(f"| {r['task']} | {r['step']} | " + " | ".join(cells)
                     + f" | {r['step_ms']:.2f} | {r['layer_ms']:.2f} | {r['step_over_layer']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", choices=tasks.available(), default=tasks.available())
    p.add_argument("--preset", default="cpu", help="the tasks' model preset (default cpu)")
    p.add_argument("--budgets", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default results/benchmarks/student-latency-<device type>.json)")
    args = p.parse_args(argv)
    if len(args.budgets) < 2 or min(args.budgets) < 1:
        p.error(f"--budgets: expected two or more NFE >= 1, got {args.budgets}")
    budgets = sorted(set(args.budgets))
    device = torch.device(args.device)
    tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {"command": " ".join(["python", "benchmarks/student_latency.py", *(argv if argv is not None else sys.argv[1:])]),
            "device": device_name(device), "torch": torch.__version__, "commit": git_commit(), "seed": args.seed,
            "preset": args.preset, "budgets": budgets, "repeats": args.repeats,
            "student_init": DEFAULTS["student_init"]}
    rows = []
    for name in args.tasks:
        torch.manual_seed(args.seed)
        rows += measure(name, args.preset, budgets, device, args.repeats)
        print(f"done: {name}", file=sys.stderr)
    md = markdown(meta, rows)
    print(md)
    out = Path(args.out) if args.out else ROOT / "results" / "benchmarks" / f"student-latency-{device.type}.json"
    atomic_write_json(out, {"meta": meta, "rows": rows})
    atomic_write_text(out.with_suffix(".md"), md)


if __name__ == "__main__":
    main()
