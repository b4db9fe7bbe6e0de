"""What one rank runs in tests/test_distributed.py, launched by torchrun (or plain python for one rank).

Usage: distributed_worker.py MODE WORKDIR [--kill-at STEP]
- curve: distil the toy student on WORKDIR/traj for 20 steps; the main rank writes the loss curve
  and the final weights to WORKDIR/curve-<world>.pt;
- sample: sample the toy trajectories sharded by rank into WORKDIR/sharded-<world>;
- resume: distil with checkpoints in WORKDIR/run; with --kill-at, rank 1 kills itself at that step;
- hyperdeq: train HyperDEQ on WORKDIR/traj for 20 steps; the main rank writes WORKDIR/hyperdeq-<world>.pt.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ToyDEQ, toy_batches  # noqa: E402

from cdeq import distributed  # noqa: E402
from cdeq.baselines import HyperDEQ, train_hyperdeq  # noqa: E402
from cdeq.consistency import (ConsistencyDEQ, DistillConfig, HyperDEQConfig, Trajectories, distill,  # noqa: E402
                              sample_trajectories)
from cdeq.consistency.sharded import open_trajectories, part_dir, write_parts  # noqa: E402
from cdeq.io import save_checkpoint  # noqa: E402

CONFIG = DistillConfig(steps=20, batch_size=16, log_every=1, checkpoint_every=5, lambda_global=1.0, lambda_task=0.0,
                       rollout_steps=2)


def curve(work: Path) -> None:
    student = ConsistencyDEQ(ToyDEQ(), init="linear")
    history = distill(student, Trajectories.open(work / "traj"), CONFIG, progress=False)
    if distributed.is_main():
        save_checkpoint(work / f"curve-{distributed.world_size()}.pt",
                        {"loss": torch.tensor([h["loss"] for h in history], dtype=torch.float64),
                         "model": student.state_dict()})


def hyperdeq(work: Path) -> None:
    torch.manual_seed(0)
    hyper = HyperDEQ(ToyDEQ(), m=3)
    config = HyperDEQConfig(steps=20, batch_size=16, log_every=1, train_nfe=3)
    history = train_hyperdeq(hyper, Trajectories.open(work / "traj"), config, progress=False)
    if distributed.is_main():
        save_checkpoint(work / f"hyperdeq-{distributed.world_size()}.pt",
                        {"loss": torch.tensor([h["loss"] for h in history], dtype=torch.float64),
                         "model": hyper.state_dict()})


def sample(work: Path) -> None:
    teacher, world, rank = ToyDEQ(), distributed.world_size(), distributed.rank()
    root = work / f"sharded-{world}"
    mine = (b for i, b in enumerate(toy_batches(teacher, n=96, batch=16)) if i % world == rank)
    sample_trajectories(teacher, mine, steps=6, cache_dir=part_dir(root, world, rank))
    distributed.barrier()
    if world > 1 and distributed.is_main():
        write_parts(root, world)
    distributed.barrier()
    open_trajectories(root, teacher=teacher)


def resume(work: Path, kill_at: int | None) -> None:
    traj = Trajectories.open(work / "traj")
    if kill_at is not None and distributed.rank() == 1:
        draw, calls = traj.sample, [0]

        def dying(*args, **kwargs):
            calls[0] += 1
            if calls[0] > kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return draw(*args, **kwargs)
        traj.sample = dying
    student = ConsistencyDEQ(ToyDEQ(), init="linear")
    distill(student, traj, CONFIG, run_dir=work / "run", progress=False)
    if distributed.is_main():
        save_checkpoint(work / "resumed.pt", {"model": student.state_dict()})


if __name__ == "__main__":
    torch.set_num_threads(1)
    distributed.init("cpu")
    mode, work = sys.argv[1], Path(sys.argv[2])
    kill = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[3] == "--kill-at" else None
    {"curve": lambda: curve(work), "sample": lambda: sample(work), "resume": lambda: resume(work, kill),
     "hyperdeq": lambda: hyperdeq(work)}[mode]()
