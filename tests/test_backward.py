"""The backward building blocks: unrolled_solve's info contract, vjp_function, straight_through."""
import pytest
import torch

import cdeq
from cdeq.backward import phantom_steps, straight_through, unrolled_solve, vjp_function
from cdeq.state import StateLayout

F64 = torch.float64


def test_unrolled_solve_stops_at_tol_like_the_fixed_point_solver():
    A = torch.tensor([[0.5, 0.1], [0.0, 0.3]], dtype=F64)
    f = lambda z: z @ A.T + 1  # noqa: E731
    z0 = torch.zeros(2, 2, dtype=F64)
    z, info = unrolled_solve(f, z0, max_iter=100, tol=1e-8, stop_mode="abs", tau=1.0, trace=True)
    ref_z, ref = cdeq.solve(f, z0, solver="fixed_point", max_iter=100, tol=1e-8, stop_mode="abs")
    assert info.nfe == ref.nfe < 100 and torch.allclose(z, ref_z)
    assert torch.equal(info.steps, ref.steps) and bool(info.converged.all()) and not bool(info.diverged.any())
    assert torch.allclose(info.abs_residual, ref.abs_residual) and info.trace.shape == (info.nfe, 2)


def test_unrolled_solve_zero_budget_and_states_past_the_end():
    z0 = torch.ones(1, 3)
    z, info = unrolled_solve(lambda z: 2 * z, z0, max_iter=0, tol=0.0, stop_mode="rel", tau=1.0, return_states=[0])
    assert torch.equal(z, z0) and info.nfe == 0 and info.states[0] is not None
    assert torch.allclose(info.abs_residual, torch.tensor([3.0 ** 0.5]))
    z, info = unrolled_solve(lambda z: 0.5 * z, z0, max_iter=50, tol=1e-3, stop_mode="abs", tau=1.0,
                             return_states=[2, 50])
    assert info.nfe < 50 and torch.equal(info.states[1], z) and torch.allclose(info.states[0], z0 / 4)


def test_vjp_function_on_tuple_states_with_an_unused_part():
    z = (torch.randn(2, 3, requires_grad=True), torch.randn(2, 1, requires_grad=True))
    fz = (2 * z[0], z[0].sum(1, keepdim=True))  # z[1] is unused: its column of J is zero
    layout = StateLayout(z)
    v = torch.arange(8.0).reshape(2, 4)
    got = vjp_function(fz, z, layout)(v)
    want = torch.cat([2 * v[:, :3] + v[:, 3:], torch.zeros(2, 1)], 1)
    assert torch.allclose(got, want)


def test_straight_through_keeps_the_value_and_takes_the_gradient():
    w = torch.tensor(3.0, requires_grad=True)
    z = torch.ones(1, 2)
    out = straight_through(z, phantom_steps(lambda y: w * y, z, steps=2, tau=1.0))
    assert torch.equal(out, z)
    out.sum().backward()
    assert w.grad.item() == pytest.approx(2 * 2 * 3.0)  # d/dw sum(w^2 z) = 2 w * 2
