"""Learned initial states (cdeq.consistency.initialiser) in the C-DEQ student and in HyperDEQ."""
from __future__ import annotations

import pytest
import torch
from conftest import ToyDEQ, ToyGraphDEQ, toy_batches, toy_trajectories

from cdeq.consistency import ConsistencyDEQ, DistillConfig, distill, equilibrium_error
from cdeq.consistency.initialiser import StateInitialiser, pointwise_linear


@pytest.mark.parametrize("init", ["linear", "mlp"])
def test_untrained_learned_init_starts_at_the_teachers_z0(init):
    teacher = ToyDEQ()
    x = torch.randn(5, 8)
    paper = ConsistencyDEQ(teacher, example=x)
    learned = ConsistencyDEQ(teacher, init=init, example=x)
    learned.load_state_dict({**paper.state_dict(), **{k: v for k, v in learned.state_dict().items()
                                                      if k.startswith("initialiser.")}})
    for k in (1, 3):
        assert torch.equal(paper.infer(x, nfe=k), learned.infer(x, nfe=k))
    hidden = [m.inp for m in learned.initialiser]
    assert hidden == [None] if init == "linear" else all(h.out_features == 64 for h in hidden)


def test_unknown_init_and_bad_width_are_errors():
    with pytest.raises(ValueError, match="init: expected one of"):
        ConsistencyDEQ(ToyDEQ(), init="random")
    with pytest.raises(ValueError, match="hidden: expected an int >= 0"):
        StateInitialiser(-1, -3)
    with pytest.raises(RuntimeError, match="not built"):
        StateInitialiser(-1, 0)(torch.zeros(2, 3), torch.zeros(2, 3))


@pytest.mark.parametrize("teacher_cls, x", [(ToyDEQ, torch.randn(3, 8)), (ToyGraphDEQ, torch.randn(1, 20, 5))])
@pytest.mark.parametrize("init", ["linear", "mlp"])
def test_state_dict_round_trip_builds_the_initialiser(teacher_cls, x, init):
    teacher = teacher_cls()
    a = ConsistencyDEQ(teacher, init=init, example=x)
    with torch.no_grad():
        for p in a.initialiser.parameters():
            p.normal_()
    b = ConsistencyDEQ(teacher, init=init)
    b.load_state_dict(a.state_dict())
    assert not torch.equal(a.infer(x, nfe=2), ConsistencyDEQ(teacher, example=x).infer(x, nfe=2))
    assert torch.allclose(a.infer(x, nfe=2), b.infer(x, nfe=2))


def test_distillation_trains_the_initialiser_and_it_helps_the_first_step():
    """ToyDEQ's f(0, x) = tanh(U x) sees x only pointwise; a learned z_0 = A U x lets the first
    call mix features, so the student gets closer to z* (measured: 0.077 vs 0.096 at one step,
    0.031 vs 0.056 at two)."""
    torch.manual_seed(0)
    teacher = ToyDEQ()
    train = toy_trajectories(teacher, toy_batches(teacher, n=1024, seed=1))
    test = toy_trajectories(teacher, toy_batches(teacher, n=512, seed=2))
    err = {}
    for init in ("zeros", "linear"):
        torch.manual_seed(0)
        student = ConsistencyDEQ(teacher, init=init)
        distill(student, train, DistillConfig(steps=300, lambda_task=0.0, rollout_steps=2, anchor_weight=0.0), progress=False)
        err[init] = equilibrium_error(student.state, test, [1, 2])
        if init == "linear":
            assert student.initialiser[0].out.weight.abs().max() > 1e-3
    assert err["linear"][1] < 0.9 * err["zeros"][1] and err["linear"][2] < 0.8 * err["zeros"][2], err


@pytest.mark.parametrize("hidden", [0, 16])
def test_nchw_maps_use_1x1_convolutions_equal_to_the_per_position_net(hidden):
    from cdeq.consistency.initialiser import PointwiseNet

    torch.manual_seed(0)
    net = PointwiseNet(8, hidden, 12, 1)
    for p in net.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(3, 8, 5, 5)
    h = x.movedim(1, -1)
    ref = net.out(h if hidden == 0 else torch.nn.functional.gelu(net.inp(h))).movedim(-1, 1)
    out = net(x)
    assert out.is_contiguous() and torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("shape, dim", [((3, 4, 5, 6), 1), ((3, 4, 7), 1), ((3, 5, 4), -1), ((3, 4, 2, 5), 2)])
@pytest.mark.parametrize("per_sample", [False, True])
def test_pointwise_linear_is_a_linear_map_along_dim(shape, dim, per_sample):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    c = shape[dim]
    weight = torch.randn(6, c, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, 6, dtype=torch.float64) if per_sample else torch.randn(6, dtype=torch.float64)
    out = pointwise_linear(x, weight, bias, dim)
    moved = x.movedim(dim, -1)
    want = (moved @ weight.T + (bias.reshape(3, *[1] * (x.dim() - 2), 6) if per_sample else bias)).movedim(-1, dim)
    assert out.shape == want.shape
    torch.testing.assert_close(out, want)
    g_out = torch.autograd.grad(out.square().sum(), (x, weight))
    g_want = torch.autograd.grad(want.square().sum(), (x, weight))
    for a, b in zip(g_out, g_want):
        torch.testing.assert_close(a, b)
