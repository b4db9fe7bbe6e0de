"""jacobian_penalty (Eq. 17-18), spectral_radius, fixed_point_correction (Eq. 19), mixed_init."""
import pytest
import torch

import cdeq

F64 = torch.float64


def test_hutchinson_estimate_matches_exact_frobenius_norm_of_a_linear_map():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, generator=g, dtype=F64, requires_grad=True)
    torch.manual_seed(0)
    z = torch.randn(50, 6, dtype=F64, requires_grad=True)
    penalty = cdeq.jacobian_penalty(z @ A.T, z, samples=40)
    exact = (A.detach() ** 2).sum() / 6
    assert abs(penalty.item() - exact.item()) < 0.05 * exact.item()
    (grad,) = torch.autograd.grad(penalty, A)  # create_graph: the penalty trains f
    assert torch.allclose(grad, 2 * A.detach() / 6, rtol=0, atol=0.15 * (2 * A.detach() / 6).abs().max().item())


def test_jacobian_penalty_of_tuple_states_and_errors():
    z = (torch.randn(4, 2, requires_grad=True), torch.randn(4, 3, requires_grad=True))
    fz = (3.0 * z[0], torch.zeros(4, 3) + 0.0 * z[1])  # J = diag(3, 3, 0, 0, 0): ||J||_F^2 / 5 = 18 / 5
    torch.manual_seed(0)
    assert abs(cdeq.jacobian_penalty(fz, z, samples=200).item() - 3.6) < 0.3
    with pytest.raises(ValueError, match="z must require grad and fz = f\\(z\\) must be computed from it"):
        cdeq.jacobian_penalty(torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="samples: expected an integer >= 1, got 0"):
        cdeq.jacobian_penalty(fz, z, samples=0)


def test_spectral_radius_of_known_matrices_per_sample():
    A = torch.tensor([[0.5, 1.0, 0.0], [0.0, -0.9, 0.3], [0.0, 0.0, 0.2]], dtype=F64)  # eigenvalues 0.5, -0.9, 0.2
    scale = torch.tensor([[1.0], [2.0]], dtype=F64)
    radius = cdeq.spectral_radius(lambda z: scale * (z @ A.T), torch.zeros(2, 3, dtype=F64), iters=200,
                                  generator=torch.Generator().manual_seed(0))
    assert torch.allclose(radius, torch.tensor([0.9, 1.8], dtype=F64), atol=1e-8)
    assert not radius.requires_grad


def test_spectral_radius_at_a_point_of_a_nonlinear_map():
    W = torch.tensor([[2.0, 0.0], [0.0, -1.0]], dtype=F64)
    z = torch.tensor([[0.0, 0.0], [10.0, 0.0]], dtype=F64)  # tanh' = 1 at 0; ~0 in the first unit at 20
    radius = cdeq.spectral_radius(lambda z: torch.tanh(z @ W.T), z, iters=100)
    assert torch.allclose(radius, torch.tensor([2.0, 1.0], dtype=F64), atol=1e-6)
    with pytest.raises(ValueError, match="iters: expected an integer >= 1"):
        cdeq.spectral_radius(lambda z: z, z, iters=0)


def test_fixed_point_correction_weights_the_last_state_one():
    states = [torch.full((2, 1), float(v), requires_grad=True) for v in (1, 2, 3)]
    loss = cdeq.fixed_point_correction(states, lambda z: z.mean(), gamma=0.5)
    assert loss.item() == pytest.approx(0.25 * 1 + 0.5 * 2 + 3)
    loss.backward()
    assert [s.grad[0, 0].item() for s in states] == [0.125, 0.25, 0.5]


def test_fixed_point_correction_errors():
    with pytest.raises(ValueError, match="states: expected a non-empty list"):
        cdeq.fixed_point_correction([], lambda z: z.sum())
    with pytest.raises(ValueError, match=r"gamma: expected a decay in \(0, 1\], got 1.5"):
        cdeq.fixed_point_correction([torch.zeros(1, 1)], lambda z: z.sum(), gamma=1.5)
    with pytest.raises(ValueError, match=r"loss_fn: expected a scalar tensor loss, got Tensor of shape \(1, 1\)"):
        cdeq.fixed_point_correction([torch.zeros(1, 1)], lambda z: z)


def test_mixed_init_statistics():
    z = cdeq.mixed_init((64, 3, 20, 20), generator=torch.Generator().manual_seed(0))
    assert z.shape == (64, 3, 20, 20)
    flat = z.reshape(64, -1)
    assert bool(((flat == 0).sum(dim=1) == 600).all())  # exactly half of every sample
    nonzero = flat[flat != 0]
    assert abs(nonzero.mean().item()) < 0.02 and abs(nonzero.std().item() - 1) < 0.02
    zero_places = (flat == 0).float()
    assert not torch.equal(zero_places[0], zero_places[1])  # random places, different per sample


def test_mixed_init_like_a_state():
    like = (torch.zeros(2, 5, dtype=F64), torch.zeros(2, 3, 3, dtype=F64))
    z = cdeq.mixed_init(like)
    assert isinstance(z, tuple) and z[0].shape == (2, 5) and z[1].shape == (2, 3, 3)
    assert z[0].dtype == F64 and bool(((z[1].reshape(2, -1) == 0).sum(1) == 4).all())
    with pytest.raises(ValueError, match=r"expected a batched shape \(B, \.\.\.\) of at least 2 dimensions, got \(5,\)"):
        cdeq.mixed_init((5,))
    with pytest.raises(ValueError, match="expected a shape \\(B, ...\\), a tensor or a tuple of tensors, got 'abc'"):
        cdeq.mixed_init("abc")
