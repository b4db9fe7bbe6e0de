"""The direct baseline: the student's network unrolled J steps, trained on the task loss alone."""
from __future__ import annotations

import pytest
import torch
from conftest import ToyDEQ, toy_batches

from cdeq.baselines import train_direct
from cdeq.consistency import ConsistencyDEQ, DirectConfig, sample_trajectories


def _accuracy(model, batches, J):
    hits = sum(int((model.predict(x, nfe=J).argmax(-1) == y).sum()) for x, y in batches)
    return hits / sum(len(y) for _, y in batches)


def test_direct_baseline_learns_the_task_at_its_nfe():
    teacher = ToyDEQ()
    train = toy_batches(teacher, n=1024, seed=1)
    traj = sample_trajectories(teacher, train, steps=3)
    model = ConsistencyDEQ(teacher, structure="anderson")
    before = _accuracy(model, train, 2)
    history = train_direct(model, traj, DirectConfig(nfe=2, steps=150), progress=False)
    assert history[-1]["loss"] < history[0]["loss"]
    assert _accuracy(model, train, 2) > before
    model.infer(train[0][0], nfe=2)
    assert model.nfe == 2


def test_direct_baseline_checks_its_arguments():
    teacher = ToyDEQ()
    with_labels = sample_trajectories(teacher, toy_batches(teacher, n=32, batch=32), steps=2)
    no_labels = sample_trajectories(teacher, [torch.randn(8, 8)], steps=2)
    with pytest.raises(ValueError, match="nfe"):
        DirectConfig(nfe=0)
    with pytest.raises(TypeError, match="DirectConfig"):
        train_direct(ConsistencyDEQ(teacher), with_labels, {"nfe": 1})
    with pytest.raises(ValueError, match="labels"):
        train_direct(ConsistencyDEQ(teacher), no_labels, DirectConfig(steps=1))
