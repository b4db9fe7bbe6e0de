"""Throughput with 1 and N ranks, and what each trajectory store costs (see benchmarks/README.md).

Section `ranks`: distillation and trajectory-sampling throughput (items/s) on MNIST with the task's
MDEQ teacher (its initial weights: the time does not depend on them), each world size launched with
torchrun (gloo on CPU, one thread per rank), every rank on its share of each global batch.
Section `stores`: the store's size per strategy and task (`storage_table`'s arithmetic for the
task's state shapes, K and its training items), and the time of one distillation step reading a
`full` and a `subset` store, and of the `online` teacher solve a step would add instead.

    python benchmarks/scaling.py --ranks 1 2    # writes results/benchmarks/scaling-cpu.{json,md}
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TASK, K, SAMPLE_BATCHES, STEPS, WARMUP = "mnist", 10, 8, 12, 2
BATCH = int(os.environ.get("CDEQ_BENCH_BATCH", "32"))  # the global batch (the mnist cpu preset distils with 32)


def teacher_and_batches(n: int):
    from cdeq import tasks

    task = tasks.get(TASK)
    torch.manual_seed(0)
    teacher = task.build_teacher("cpu").eval().requires_grad_(False)
    return teacher, list(task.batches("train", batch_size=BATCH, limit=n))


def time_sampling(work: Path) -> float:
    """Items/s of sampling K Anderson steps, every rank its strided share of the batches."""
    from cdeq import distributed
    from cdeq.consistency import Storage, sample_trajectories
    from cdeq.consistency.sharded import part_dir, write_parts

    teacher, batches = teacher_and_batches(SAMPLE_BATCHES)
    world, rank = distributed.world_size(), distributed.rank()
    distributed.barrier()
    t0 = time.perf_counter()
    sample_trajectories(teacher, (b for i, b in enumerate(batches) if i % world == rank), steps=K,
                        cache_dir=part_dir(work / "traj", world, rank), storage=Storage(dtype="float16"))
    distributed.barrier()
    seconds = time.perf_counter() - t0
    if world > 1 and distributed.is_main():
        write_parts(work / "traj", world)
    distributed.barrier()
    return SAMPLE_BATCHES * BATCH / seconds


def time_distillation(work: Path, store: str = "full") -> float:
    """Items/s of distillation steps (global batch BATCH), after WARMUP steps."""
    from cdeq.consistency import ConsistencyDEQ, DistillConfig, distill
    from cdeq.consistency.sharded import open_trajectories

    teacher, _ = teacher_and_batches(0)
    traj = open_trajectories(work / ("traj" if store == "full" else f"traj-{store}"))
    student = ConsistencyDEQ(teacher, init="linear")
    times: list[float] = []
    draw = traj.sample

    def timed(*args, **kwargs):
        times.append(time.perf_counter())
        return draw(*args, **kwargs)
    traj.sample = timed
    distill(student, traj, DistillConfig(steps=STEPS + WARMUP, batch_size=BATCH, rollout_steps=2), progress=False)
    return STEPS * BATCH / (times[-1] - times[WARMUP])


def worker(work: Path) -> None:
    from cdeq import distributed

    torch.set_num_threads(1)
    distributed.init("cpu")
    row = {"ranks": distributed.world_size(), "sampling_items_per_s": time_sampling(work),
           "distill_items_per_s": time_distillation(work)}
    if distributed.is_main():
        (work / "row.json").write_text(json.dumps(row))


def ranks_section(worlds: list[int]) -> list[dict]:
    rows = []
    for world in worlds:
        with tempfile.TemporaryDirectory(prefix="cdeq-scaling-") as tmp:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                   __file__, "--worker", tmp]
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            rows.append(json.loads((Path(tmp) / "row.json").read_text()))
    base = rows[0]
    for row in rows:
        row["distill_speedup"] = row["distill_items_per_s"] / base["distill_items_per_s"]
        row["sampling_speedup"] = row["sampling_items_per_s"] / base["sampling_items_per_s"]
    return rows


def stores_section(keep: int = 4) -> dict:
    """Sizes per strategy and task, and the step times of one process on MNIST for each store."""
    from cdeq import tasks
    from cdeq.consistency import OnlineTeacher, Storage, sample_trajectories, storage_table

    sizes = {}
    for name, items in (("mnist", 60000), ("fashion-mnist", 60000), ("cora", 1)):
        task = tasks.get(name)
        teacher = task.build_teacher("cpu").eval()
        x, _ = next(iter(task.batches("train", limit=1)))
        with torch.no_grad():
            z = teacher.init_state(teacher.inject(x))
        shapes = [tuple(p.shape[1:]) for p in (z if isinstance(z, tuple) else (z,))]
        sizes[name] = storage_table(shapes, 30, items, keeps=(keep,))
    teacher, batches = teacher_and_batches(SAMPLE_BATCHES)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="cdeq-stores-") as tmp:
        work = Path(tmp)
        sample_trajectories(teacher, batches, steps=K, cache_dir=work / "traj", storage=Storage(dtype="float16"))
        sample_trajectories(teacher, batches, steps=K, cache_dir=work / "traj-subset",
                            storage=Storage("subset", keep, "float16"))
        step_ms = {store: 1e3 * BATCH / time_distillation(work, store) for store in ("full", "subset")}
    online = OnlineTeacher(teacher, steps=K, solver_options={"m": 5})
    x = batches[0][0]
    online.states(x, torch.randint(0, K + 1, (len(x),)))
    t0 = time.perf_counter()
    for _ in range(3):
        online.states(x, torch.randint(0, K + 1, (len(x),)))
    step_ms["online_teacher_solve"] = 1e3 * (time.perf_counter() - t0) / 3
    return {"sizes_md": sizes, "step_ms": step_ms, "keep": keep}


def markdown(meta: dict, rows: list[dict], stores: dict) -> str:
    lines = [f"# Scaling on {meta['device']}", "", f"`{meta['command']}` — torch {meta['torch']}, commit "
             f"{meta['commit']}, seed 0; MNIST MDEQ teacher (cpu preset), K = {K}, global batch {BATCH}, "
             "one thread per rank, gloo.", "", "## Ranks", "",
             "| ranks | sampling items/s | x 1 rank | distillation items/s | x 1 rank |", "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['ranks']} | {r['sampling_items_per_s']:.1f} | {r['sampling_speedup']:.2f} | "
                     f"{r['distill_items_per_s']:.1f} | {r['distill_speedup']:.2f} |")
    lines += ["", "## Stores", "", f"Time per distillation step, one process (ms, MNIST, K = {K}, keep = {stores['keep']}); "
              "`online` would add its teacher solve to the full-store step:", "",
              "| full | subset | online teacher solve |", "|---:|---:|---:|",
              "| {full:.1f} | {subset:.1f} | {online_teacher_solve:.1f} |".format(**stores["step_ms"]), ""]
    for name, table in stores["sizes_md"].items():
        lines += [f"Store sizes for {name} (fp16, K = 30):", "", table, ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=BATCH, help="global batch of sampling and distillation")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "scaling-cpu"))
    args = parser.parse_args()
    if args.worker:
        return worker(Path(args.worker))
    os.environ["CDEQ_BENCH_BATCH"] = str(args.batch)  # the torchrun workers read it
    globals()["BATCH"] = args.batch
    from cdeq.io import atomic_write_json, atomic_write_text
    from cdeq.measure import device_name, git_commit

    torch.set_num_threads(1)
    meta = {"command": "python benchmarks/scaling.py " + " ".join(sys.argv[1:]), "device": device_name(torch.device("cpu")),
            "torch": torch.__version__, "commit": git_commit(), "seed": 0}
    rows = ranks_section(args.ranks)
    stores = stores_section()
    text = markdown(meta, rows, stores)
    print(text)
    atomic_write_json(Path(args.out + ".json"), {**meta, "ranks": rows, "stores": stores})
    atomic_write_text(Path(args.out + ".md"), text)


if __name__ == "__main__":
    main()
