"""Several ranks (torchrun, gloo on CPU) against one process: the same distillation, the same
trajectories, and a killed rank that fails the job and resumes exactly."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ToyDEQ, toy_batches

from cdeq.consistency import Trajectories, sample_trajectories
from cdeq.consistency.sharded import open_trajectories
from cdeq.io import load_checkpoint

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
pytestmark = pytest.mark.slow


def launch(ranks: int, *args: str) -> subprocess.CompletedProcess:
    """torchrun on this machine (one thread per rank), or plain python for one rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
           if ranks > 1 else [sys.executable])
    return subprocess.run(cmd + [str(WORKER), *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("dist")
    teacher = ToyDEQ()
    sample_trajectories(teacher, toy_batches(teacher, n=128, batch=32), steps=6, cache_dir=work / "traj")
    return work


def assert_two_ranks_train_as_one(work: Path, mode: str) -> None:
    """The worker's ``mode`` under one rank and two: the same 20-step loss curve and final weights."""
    for ranks in (1, 2):
        done = launch(ranks, mode, str(work))
        assert done.returncode == 0, done.stdout + done.stderr
    one, two = (load_checkpoint(work / f"{mode}-{r}.pt") for r in (1, 2))
    assert len(one["loss"]) == 20
    assert torch.allclose(two["loss"], one["loss"], rtol=1e-5, atol=0), (one["loss"], two["loss"])
    for name, p in one["model"].items():
        assert torch.allclose(two["model"][name], p, rtol=1e-4, atol=1e-6), name


def test_two_ranks_with_half_batches_give_the_one_rank_loss_curve(work):
    """The global batch is drawn on every rank from the step's generator and split, the distances'
    scale is the global batch's, and DDP averages the gradients of equal halves: with the terms that
    are means over rows (global, rollout, anchor) the two runs agree to rounding."""
    assert_two_ranks_train_as_one(work, "curve")


def test_two_ranks_train_hyperdeq_as_one(work):
    """HyperDEQ's loss divides by the mean square of the global batch's z* (not each rank's half),
    so two ranks with half batches follow the one-rank loss curve to rounding."""
    assert_two_ranks_train_as_one(work, "hyperdeq")


def test_sampling_sharded_over_two_ranks_writes_the_one_rank_states(work):
    for ranks in (1, 2):
        done = launch(ranks, "sample", str(work))
        assert done.returncode == 0, done.stdout + done.stderr
    one, two = Trajectories.open(work / "sharded-1"), open_trajectories(work / "sharded-2")
    assert one.shard_sizes == two.shard_sizes and len(one) == len(two) == 96
    for shard, rows in one.chunks(16):
        assert torch.equal(one.states(shard, rows, 6), two.states(shard, rows, 6))
        assert torch.equal(one.inputs(shard, rows), two.inputs(shard, rows))


def test_a_killed_rank_fails_the_job_by_name_and_a_rerun_resumes_exactly(work):
    killed = launch(2, "resume", str(work), "--kill-at", "12")
    assert killed.returncode != 0
    assert "rank" in killed.stderr.lower() and "1" in killed.stderr, killed.stderr[-2000:]
    assert load_checkpoint(work / "run" / "checkpoint.pt")["step"] == 10
    done = launch(2, "resume", str(work))
    assert done.returncode == 0, done.stdout + done.stderr
    straight = load_checkpoint(work / "curve-2.pt")["model"]  # the uninterrupted two-rank run
    resumed = load_checkpoint(work / "resumed.pt")["model"]
    for name, p in straight.items():
        assert torch.equal(resumed[name], p), name
