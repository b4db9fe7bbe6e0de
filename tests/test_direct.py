"""The direct baseline: the student's network unrolled J steps, trained on the task loss alone."""
from __future__ import annotations

import pytest
import torch
from conftest import ToyDEQ, toy_batches

from cdeq.baselines import train_direct
from cdeq.baselines.direct import DirectLoss
from cdeq.consistency import ConsistencyDEQ, DirectConfig, sample_trajectories
from cdeq.models import DEQTransformer


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


def test_a_loss_at_the_state_trains_as_the_readouts_loss_does():
    """An adaptive softmax's own loss (what the pipeline passes for WikiText-2) equals the
    cross-entropy of the full log-probabilities, value and gradient, at a fraction of the cost."""
    teacher = DEQTransformer(50, d_model=16, n_heads=2, d_ff=32, max_len=8, cutoffs=(10, 30), weight_norm=False)
    student = ConsistencyDEQ(teacher)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 50, (4, 8), generator=gen), torch.randint(0, 50, (4, 8), generator=gen)
    y[0, :3] = -100
    losses = [DirectLoss(student, DirectConfig(nfe=2), state_loss)((x, y))[0]
              for state_loss in (None, lambda z, y: teacher.lm_loss(z, y))]
    trained = [p for p in student.parameters() if p.requires_grad]
    grads = [torch.autograd.grad(loss, trained, allow_unused=True) for loss in losses]
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)
    assert sum(g is not None for g in grads[0]) > 0
    for a, b in zip(*grads):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, rtol=1e-4, atol=1e-7))
