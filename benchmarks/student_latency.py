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
by default); the fused step compiles during the warm-up. ``--proj-ranks full 8`` measures each
task's student with each form of W (Eq. 8): ``full`` the ``C x (C + 1)`` matrix, an int r the
identity plus a rank-r map (``ConsistencyDEQ(proj_rank=r)``), each against bare calls timed in the
same rounds. ``--passes P`` measures every student P times in turn (``--repeats`` rounds each) and
reports the median over passes of each figure, so that a change of load during the run hits every
form alike rather than the one measured last. Where a step's time goes: the parts of one step after
the first (the teacher's layer, which is what the student's f' costs; W of each form; the residual,
Anderson step and skip, eager and fused) timed in turn within each of ``5 * --repeats`` rounds.

    python benchmarks/student_latency.py --threads 1    # writes results/benchmarks/student-latency-cpu.{json,md}
    python benchmarks/student_latency.py --threads 1 --tasks cora --proj-ranks full 8 --passes 5 \
        --out results/benchmarks/student-proj-cora.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Optional

import torch

from cdeq import tasks
from cdeq.consistency import ConsistencyDEQ
from cdeq.consistency.student import fused_inference_step, inference_step, residual
from cdeq.io import atomic_write_json, atomic_write_text
from cdeq.measure import device_name, git_commit, student_latency, time_rounds_ms
from cdeq.pipeline import DEFAULTS
from cdeq.runtime import tune_cpu_allocator
from cdeq.state import as_tuple, to_device

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.15  # the pipeline issue's bound on C-DEQ's time over the bare layer calls


def proj_rank(text: str) -> Optional[int]:
    """A ``--proj-ranks`` entry: ``full`` (None: the full W) or a rank >= 1."""
    if text == "full":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected 'full' or a rank >= 1, got {text!r}")
    return int(text)


def proj_label(rank: Optional[int]) -> str:
    return "full" if rank is None else f"rank {rank}"


def step_parts(students: dict[Optional[int], ConsistencyDEQ], teacher: torch.nn.Module, x: torch.Tensor,
               device: torch.device, repeats: int) -> dict[str, float]:
    """Median ms of the parts of one student step after the first, on the teacher's own iterates:
    its layer, W of each form in ``students`` and the step of Eq. 7 and 5 (eager; fused if it compiles)."""
    student = next(iter(students.values()))
    with torch.no_grad():
        u = teacher.inject(x)
        z_prev = teacher.layer(teacher.init_state(u), u)
        z = teacher.layer(z_prev, u)
        h_prev, hz = z, teacher.layer(z, u)
        res_prev = residual(z_prev, h_prev)
    c_skip = torch.as_tensor(0.5, dtype=as_tuple(z)[0].dtype, device=as_tuple(z)[0].device)
    step_args = (z, hz, z_prev, h_prev, res_prev, c_skip, student.beta_aa, student.aa_lam)
    fns = {"layer": lambda: teacher.layer(z, u)}
    for rank, s in students.items():
        fns[f"W {proj_label(rank)}"] = lambda s=s: [proj(p, 0.5) for proj, p in zip(s.proj, as_tuple(hz))]
    fns["AA + skip, eager"] = lambda: inference_step(*step_args)
    try:
        with torch.no_grad():
            fused_inference_step()(*step_args)
        fns["AA + skip, fused"] = lambda: fused_inference_step()(*step_args)
    except Exception as err:  # noqa: BLE001 -- no compiler here: the eager figure stands alone
        print(f"fused step not compiled ({type(err).__name__}); parts without it", file=sys.stderr)
    times = time_rounds_ms(fns, device, warmup=3, repeats=repeats)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(task_name: str, preset: str, budgets: list[int], device: torch.device, repeats: int,
            proj_ranks: list[Optional[int]], passes: int) -> tuple[list[dict], dict]:
    """One task's rows, eager and fused C-DEQ steps for each form of W: times and ratios per budget
    (medians over ``passes``, the students measured in turn in each), per-step costs; and the parts of
    a step (:func:`step_parts`)."""
    task = tasks.get(task_name)
    teacher = task.build_teacher(preset).to(device).eval().requires_grad_(False)
    x, _ = next(iter(task.batches("test", limit=1)))
    x = to_device(x, device)
    variants = [(fused, rank) for fused in (False, True) for rank in proj_ranks]
    students = {v: ConsistencyDEQ(teacher, init=DEFAULTS["student_init"], proj_rank=v[1], example=x).to(device).eval()
                for v in variants}
    measured: dict[tuple, list[dict]] = {v: [] for v in variants}
    for _ in range(passes):
        for v, student in students.items():
            student.fused = v[0]
            measured[v].append(student_latency(student, teacher, x, budgets, device, repeats=repeats))
    rows = []
    for (fused, rank), runs in measured.items():
        per_k = {str(k): {name: statistics.median(r[str(k)][name] for r in runs) for name in runs[0][str(k)]}
                 for k in budgets}
        step = "fused" if students[(fused, rank)].fused else "eager"
        rows.append({"task": task_name, "proj": proj_label(rank), "step": step, "latency": per_k,
                     **per_step(per_k, budgets), "passes": runs})
    parts = step_parts({rank: students[(False, rank)] for rank in proj_ranks}, teacher, x, device, 5 * repeats)
    return rows, {"task": task_name, "ms": parts}


def per_step(per_k: dict, budgets: list[int]) -> dict:
    """The student's step and one bare layer call: differences between the largest and the smallest budget."""
    lo, hi = str(min(budgets)), str(max(budgets))
    steps = max(budgets) - min(budgets)
    step_ms = (per_k[hi]["cdeq_ms"] - per_k[lo]["cdeq_ms"]) / steps
    layer_ms = (per_k[hi]["bare_ms"] - per_k[lo]["bare_ms"]) / steps
    return {"step_ms": step_ms, "layer_ms": layer_ms, "step_over_layer": step_ms / layer_ms}


def markdown(meta: dict, rows: list[dict], parts: list[dict]) -> str:
    budgets = meta["budgets"]
    lines = [f"# C-DEQ time per batch against bare teacher-layer calls ({meta['device']})", "",
             f"`{meta['command']}` — torch {meta['torch']}, commit {meta['commit']}, seed {meta['seed']}, "
             f"preset {meta['preset']}, median of {meta['repeats']} alternating repeats"
             + (f", median over {meta['passes']} passes (every student in turn)" if meta["passes"] > 1 else ""), "",
             "ratio = time of `student.predict(x, k)` / time of injection + k bare teacher-layer calls + readout "
             f"(target <= {TARGET}); per step: the difference between NFE {budgets[-1]} and NFE {budgets[0]} over "
             "their NFE.", "",
             "| task | W | C-DEQ step | " + " | ".join(f"NFE {k}: C-DEQ ms / bare ms (ratio)" for k in budgets)
             + " | C-DEQ step ms | layer call ms | step / layer |",
             "|---|---|---|" + "---|" * (len(budgets) + 3)]
    for r in rows:
        cells = [f"{v['cdeq_ms']:.1f} / {v['bare_ms']:.1f} ({v['ratio']:.3f})" for v in (r["latency"][str(k)] for k in budgets)]
        lines.append(f"| {r['task']} | {r['proj']} | {r['step']} | " + " | ".join(cells)
                     + f" | {r['step_ms']:.2f} | {r['layer_ms']:.2f} | {r['step_over_layer']:.3f} |")
    if meta["passes"] > 1:  # the spread the medians hide: how far one pass's ratio strays on a shared machine
        lines += ["", f"Ratio at NFE {budgets[-1]} in each pass:", "", "| task | W | C-DEQ step | ratio per pass |",
                  "|---|---|---|---|"]
        lines += [f"| {r['task']} | {r['proj']} | {r['step']} | "
                  + " ".join(f"{run[str(budgets[-1])]['ratio']:.3f}" for run in r["passes"]) + " |" for r in rows]
    names = list(parts[0]["ms"])
    lines += ["", f"Where a step goes: ms of each part of one step after the first (medians of {5 * meta['repeats']} "
              "rounds, the parts in turn; a step is the layer's call in f', W and the AA step + skip):", "",
              "| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {q['task']} | " + " | ".join(f"{q['ms'][n]:.3f}" for n in names) + " |" for q in parts]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", choices=tasks.available(), default=tasks.available())
    p.add_argument("--preset", default="cpu", help="the tasks' model preset (default cpu)")
    p.add_argument("--budgets", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--passes", type=int, default=1, help="times every student is measured, in turn (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--proj-ranks", nargs="+", type=proj_rank, default=[None], metavar="full|R",
                   help="forms of W (Eq. 8) to measure: full, or a rank R of W - I (default: full)")
    p.add_argument("--out", default=None, help="JSON path (default results/benchmarks/student-latency-<device type>.json)")
    args = p.parse_args(argv)
    if len(args.budgets) < 2 or min(args.budgets) < 1:
        p.error(f"--budgets: expected two or more NFE >= 1, got {args.budgets}")
    if args.passes < 1 or args.repeats < 1:
        p.error(f"--passes, --repeats: expected ints >= 1, got {args.passes}, {args.repeats}")
    budgets = sorted(set(args.budgets))
    device = torch.device(args.device)
    tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {"command": " ".join(["python", "benchmarks/student_latency.py", *(argv if argv is not None else sys.argv[1:])]),
            "device": device_name(device), "torch": torch.__version__, "commit": git_commit(), "seed": args.seed,
            "preset": args.preset, "budgets": budgets, "repeats": args.repeats, "passes": args.passes,
            "student_init": DEFAULTS["student_init"], "proj_ranks": [proj_label(r) for r in args.proj_ranks]}
    rows, parts = [], []
    for name in args.tasks:
        torch.manual_seed(args.seed)
        task_rows, task_parts = measure(name, args.preset, budgets, device, args.repeats, args.proj_ranks, args.passes)
        rows += task_rows
        parts.append(task_parts)
        print(f"done: {name}", file=sys.stderr)
    md = markdown(meta, rows, parts)
    print(md)
    out = Path(args.out) if args.out else ROOT / "results" / "benchmarks" / f"student-latency-{device.type}.json"
    atomic_write_json(out, {"meta": meta, "rows": rows, "parts": parts})
    atomic_write_text(out.with_suffix(".md"), md)


if __name__ == "__main__":
    main()
