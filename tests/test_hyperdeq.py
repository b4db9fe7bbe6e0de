"""HyperDEQ baseline (Bai, Koltun, Kolter 2021): exact NFE, classic Anderson at init, learned gain."""
from __future__ import annotations

import pytest
import torch
from conftest import ToyDEQ, ToyTupleDEQ, count_layer_calls, toy_batches

import cdeq
from cdeq.baselines import HyperDEQ, train_hyperdeq
from cdeq.consistency import HyperDEQConfig, equilibrium_error, sample_trajectories, teacher_error


def test_untrained_hyperdeq_is_classic_anderson_and_counts_nfe():
    teacher = ToyDEQ()
    hyper = HyperDEQ(teacher, m=3, tau=0.8)
    x = torch.randn(6, 8)
    hyper.build(x)
    calls = count_layer_calls(hyper.teacher)
    with torch.no_grad():
        u = teacher.inject(x)
        for k in (0, 1, 4):
            calls[0] = 0
            z = hyper.state(x, nfe=k)
            assert calls[0] == k and hyper.nfe == k  # the initialiser calls no f
            _, info = cdeq.solve(lambda z: teacher.layer(z, u), teacher.init_state(u), m=3, tau=0.8,
                                 max_iter=max(k, 1), tol=0.0, return_states=[k])
            assert torch.allclose(z, info.states[0], atol=1e-5)


def test_hyperdeq_beats_anderson_at_two_nfe():
    teacher = ToyDEQ()
    train = sample_trajectories(teacher, toy_batches(teacher, n=1024, seed=1), steps=20, solver_options={"m": 5})
    test = sample_trajectories(teacher, toy_batches(teacher, n=512, seed=2), steps=20, solver_options={"m": 5})
    hyper = HyperDEQ(teacher, m=5)
    history = train_hyperdeq(hyper, train, HyperDEQConfig(steps=300, train_nfe=4), progress=False)
    assert history[-1]["loss"] < history[0]["loss"]
    ours = equilibrium_error(lambda x, k: hyper.state(x, nfe=k), test, [2])
    anderson = teacher_error(test, [2])  # the teacher's own Anderson iterate after 2 calls of f
    assert ours[2] < 0.7 * anderson[2], (ours, anderson)


def test_unalignable_injection_is_an_error_and_state_dict_round_trip():
    teacher = ToyTupleDEQ()
    with pytest.raises(ValueError, match="cannot be aligned"):  # a flat injection cannot feed (B, C, L) parts
        HyperDEQ(teacher, example=torch.randn(4, 6))
    toy = ToyDEQ()
    a = HyperDEQ(toy, example=torch.randn(2, 8))
    with torch.no_grad():
        a.init_nets[0].out.weight.normal_()
    b = HyperDEQ(toy)
    b.load_state_dict(a.state_dict())
    assert torch.allclose(a.state(torch.ones(2, 8), nfe=2), b.state(torch.ones(2, 8), nfe=2))


def test_solve_is_the_deprecated_name_of_state():
    hyper = HyperDEQ(ToyDEQ(), example=torch.randn(2, 8))
    x = torch.randn(2, 8)
    with pytest.warns(DeprecationWarning, match="HyperDEQ.state"):
        z = hyper.solve(x, 2)
    assert torch.equal(z, hyper.state(x, 2))
