"""Latency of the exported student (``as_module``) on the real model families (see benchmarks/README.md).

For each task: the teacher of the task's preset with its initial weights and the C-DEQ student
with the pipeline's default options, W perturbed off the identity (latency and agreement do not
depend on training, and a perturbed W exercises every op), and the first test batch. For each
budget k, ``student.eval().as_module(nfe=k)`` runs eager, as the ``torch.export`` program and as
an ONNX Runtime session (``torch.onnx.export(dynamo=True)``), the three timed in turn within each
round (:func:`cdeq.measure.time_rounds_ms`); ``max |err|`` is the largest difference of the
outputs from eager. ONNX Runtime gets the same number of intra-op threads as torch.

    python benchmarks/export_latency.py --threads 1   # writes results/benchmarks/export-latency-cpu.{json,md}
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from cdeq import tasks
from cdeq.consistency import ConsistencyDEQ
from cdeq.io import atomic_write_json, atomic_write_text
from cdeq.measure import device_name, git_commit, time_rounds_ms
from cdeq.pipeline import DEFAULTS
from cdeq.runtime import tune_cpu_allocator

ROOT = Path(__file__).resolve().parents[1]
FAMILY_TASKS = ["cora", "mnist", "gutenberg"]  # one per model family: IGNN, MDEQ, DEQ transformer


def student_for(task_name: str, preset: str, seed: int) -> tuple[ConsistencyDEQ, torch.Tensor]:
    """The task's untrained student (W off the identity) and its first test batch."""
    task = tasks.get(task_name)
    torch.manual_seed(seed)
    teacher = task.build_teacher(preset).eval().requires_grad_(False)
    x, _ = next(iter(task.batches("test", limit=1)))
    student = ConsistencyDEQ(teacher, init=DEFAULTS["student_init"], example=x).eval()
    with torch.no_grad():
        for p in student.proj.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return student, x


def runners(module: torch.nn.Module, x: torch.Tensor, threads: int) -> dict[str, Callable[[], torch.Tensor]]:
    """Eager, the torch.export program and an ONNX Runtime session of ``module``, each x -> output."""
    import onnxruntime as ort

    program = torch.export.export(module, (x,)).module()
    onnx = torch.onnx.export(module, (x,), dynamo=True, verbose=False, optimize=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its constant-folding notes drown the table
    session = ort.InferenceSession(onnx.model_proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return {"eager": lambda: module(x), "torch.export": lambda: program(x),
            "onnxruntime": lambda: torch.from_numpy(session.run(None, feed)[0])}


def measure(task_name: str, preset: str, budgets: list[int], repeats: int, threads: int, seed: int) -> list[dict]:
    """One row per budget: median ms of each runner and its largest difference from eager."""
    student, x = student_for(task_name, preset, seed)
    rows = []
    for k in budgets:
        fns = runners(student.as_module(nfe=k), x, threads)
        with torch.no_grad():
            eager = fns["eager"]()
            error = {name: float((fn() - eager).abs().max()) for name, fn in fns.items()}
        times = time_rounds_ms(fns, torch.device("cpu"), warmup=2, repeats=repeats)
        rows.append({"task": task_name, "nfe": k, "shape": list(x.shape),
                     "ms": {name: statistics.median(t) for name, t in times.items()}, "max_abs_err": error})
        print(f"done: {task_name} nfe {k}", file=sys.stderr)
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    names = list(rows[0]["ms"])
    lines = [f"# Exported C-DEQ students: latency against eager ({meta['device']})", "",
             f"`{meta['command']}` — torch {meta['torch']}, onnxruntime {meta['onnxruntime']}, commit "
             f"{meta['commit']}, seed {meta['seed']}, preset {meta['preset']}, {meta['threads']} thread(s), median of "
             f"{meta['repeats']} rounds (the three runners in turn in each); the untrained student of each task "
             "(W perturbed off the identity) on its first test batch.", "",
             "| task | input | NFE | " + " | ".join(f"{n} ms" for n in names) + " | "
             + " | ".join(f"{n} / eager" for n in names[1:]) + " | max abs err (export / ORT) |",
             "|---|---|---:|" + "---:|" * (2 * len(names))]
    for r in rows:
        ms = r["ms"]
        lines.append(f"| {r['task']} | {tuple(r['shape'])} | {r['nfe']} | "
                     + " | ".join(f"{ms[n]:.2f}" for n in names) + " | "
                     + " | ".join(f"{ms[n] / ms['eager']:.2f}" for n in names[1:]) + " | "
                     + " / ".join(f"{r['max_abs_err'][n]:.1e}" for n in names[1:]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", choices=tasks.available(), default=FAMILY_TASKS)
    p.add_argument("--preset", default="cpu", help="the tasks' model preset (default cpu)")
    p.add_argument("--budgets", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "export-latency-cpu.json"))
    args = p.parse_args(argv)
    if min(args.budgets) < 1 or args.repeats < 1 or args.threads < 1:
        p.error(f"--budgets, --repeats, --threads: expected ints >= 1, got {args.budgets}, {args.repeats}, {args.threads}")
    import onnxruntime

    tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    meta = {"command": " ".join(["python", "benchmarks/export_latency.py", *(argv if argv is not None else sys.argv[1:])]),
            "device": device_name(torch.device("cpu")), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "commit": git_commit(), "seed": args.seed, "preset": args.preset, "threads": args.threads,
            "repeats": args.repeats, "student_init": DEFAULTS["student_init"]}
    rows = [row for name in args.tasks
            for row in measure(name, args.preset, sorted(set(args.budgets)), args.repeats, args.threads, args.seed)]
    md = markdown(meta, rows)
    print(md)
    out = Path(args.out)
    atomic_write_json(out, {"meta": meta, "rows": rows})
    atomic_write_text(out.with_suffix(".md"), md)


if __name__ == "__main__":
    main()
