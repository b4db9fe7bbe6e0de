"""Fixed-budget inference captured in a CUDA graph against eager (issue 18, capturable budgets).

For each task: the teacher of the task's preset with its initial weights (time does not depend
on them), its C-DEQ student with the pipeline's default options, and the first test batch. Two
computations at each NFE k, each run eagerly and replayed from a ``torch.cuda.CUDAGraph``
captured once: ``student.as_module(nfe=k)`` (x -> logits, k network calls) and the teacher's
fixed-budget Anderson, ``cdeq.solve(f, z0, max_iter=k, tol=0, check_residual=False)``, which
reads nothing on the host. Times are medians over rounds in which every variant runs in turn
(CUDA events); ``max |graph - eager|`` checks that a replay computes what eager does. A capture
that fails is reported with its error instead of a time.

    python benchmarks/cuda_graph.py --device cuda     # results/benchmarks/cuda-graph-cuda.{json,md}

Without CUDA it times eager alone and says so (the meta-device tests in tests/ are the CPU proxy
for "no host synchronisation").
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

import cdeq
from cdeq import tasks
from cdeq.consistency import ConsistencyDEQ
from cdeq.io import atomic_write_json, atomic_write_text
from cdeq.measure import device_name, git_commit, time_rounds_ms
from cdeq.pipeline import DEFAULTS
from cdeq.state import as_tuple, to_device

ROOT = Path(__file__).resolve().parents[1]
Fn = Callable[[], torch.Tensor]


def captured(fn: Fn, warmup: int = 3) -> Fn:
    """``fn`` recorded in a CUDA graph (after warm-up calls on a side stream, as the capture
    requires); the returned callable replays it and returns the graph's static output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay() -> torch.Tensor:
        graph.replay()
        return out
    return replay


def computations(student: ConsistencyDEQ, teacher: torch.nn.Module, x, k: int) -> dict[str, Fn]:
    """The two fixed-budget computations at NFE ``k``, each returning one tensor."""
    module = student.as_module(nfe=k, readout=False).eval()  # the state, as the solve returns
    u = teacher.inject(x)

    def anderson() -> torch.Tensor:
        z, _ = cdeq.solve(lambda z: teacher.layer(z, u), teacher.init_state(u), solver="anderson", max_iter=k,
                          tol=0.0, check_residual=False)
        return as_tuple(z)[0]
    return {"student": lambda: as_tuple(module(x))[0], "teacher-anderson": anderson}


def measure(name: str, preset: str, budgets: list[int], device: torch.device, repeats: int) -> list[dict]:
    task = tasks.get(name)
    teacher = task.build_teacher(preset).to(device).eval().requires_grad_(False)
    x = to_device(next(iter(task.batches("test", limit=1)))[0], device)
    student = ConsistencyDEQ(teacher, init=DEFAULTS["student_init"], example=x).to(device).eval()
    rows = []
    with torch.no_grad():
        for k in budgets:
            for what, fn in computations(student, teacher, x, k).items():
                rows.append(compare(name, what, k, fn, device, repeats))
    return rows


def compare(task: str, what: str, k: int, fn: Fn, device: torch.device, repeats: int) -> dict:
    """Eager against the replayed graph (when there is CUDA) for one computation."""
    row = {"task": task, "computation": what, "nfe": k, "graph_ms": None, "max_abs_diff": None, "error": None}
    fns = {"eager": fn}
    if device.type == "cuda":
        try:
            fns["graph"] = captured(fn)
        except Exception as err:  # reported in the table: which computation cannot be captured, and why
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    times = time_rounds_ms(fns, device, repeats=repeats)
    row["eager_ms"] = statistics.median(times["eager"])
    if "graph" in fns:
        row["graph_ms"] = statistics.median(times["graph"])
        row["max_abs_diff"] = float((fns["graph"]() - fn()).abs().max())
    print(f"  {task:<12} {what:<17} nfe {k:>2}: eager {row['eager_ms']:.3f} ms, graph "
          f"{row['graph_ms'] if row['graph_ms'] is None else round(row['graph_ms'], 3)} ms {row['error'] or ''}",
          file=sys.stderr, flush=True)
    return row


def markdown(meta: dict, rows: list[dict]) -> str:
    def cell(v: Optional[float], fmt: str) -> str:
        return "–" if v is None else format(v, fmt)
    lines = [f"# CUDA-graph replay against eager, {meta['device']}", "",
             f"`{meta['command']}` — torch {meta['torch']}, commit {meta['commit']}, seed {meta['seed']}, "
             f"preset {meta['preset']}; medians of {meta['repeats']} rounds.", ""]
    if not meta["cuda"]:
        lines += ["No CUDA device: eager times only, nothing captured.", ""]
    lines += ["| task | computation | NFE | eager ms | graph ms | eager / graph | max abs diff | capture error |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        speedup = None if r["graph_ms"] is None else r["eager_ms"] / r["graph_ms"]
        lines.append(f"| {r['task']} | {r['computation']} | {r['nfe']} | {r['eager_ms']:.3f} | "
                     f"{cell(r['graph_ms'], '.3f')} | {cell(speedup, '.2f')} | {cell(r['max_abs_diff'], '.1e')} | "
                     f"{r['error'] or ''} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", choices=tasks.available(), default=["mnist", "wikitext-2", "cora"])
    p.add_argument("--preset", default="cpu", help="the tasks' model preset (default cpu)")
    p.add_argument("--budgets", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="JSON path (default results/benchmarks/cuda-graph-<device type>.json)")
    args = p.parse_args(argv)
    if min(args.budgets) < 1 or args.repeats < 1:
        p.error(f"--budgets, --repeats: expected ints >= 1, got {args.budgets}, {args.repeats}")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this machine has no CUDA device (use --device cpu for eager times alone)")
    meta = {"command": " ".join(["python", "benchmarks/cuda_graph.py", *(argv if argv is not None else sys.argv[1:])]),
            "device": device_name(device), "torch": torch.__version__, "commit": git_commit(), "seed": args.seed,
            "preset": args.preset, "repeats": args.repeats, "cuda": device.type == "cuda"}
    rows = []
    for name in args.tasks:
        torch.manual_seed(args.seed)
        rows += measure(name, args.preset, sorted(set(args.budgets)), device, args.repeats)
    md = markdown(meta, rows)
    print(md)
    out = Path(args.out) if args.out else ROOT / "results" / "benchmarks" / f"cuda-graph-{device.type}.json"
    atomic_write_json(out, {"meta": meta, "rows": rows})
    atomic_write_text(out.with_suffix(".md"), md)


if __name__ == "__main__":
    main()
