"""cdeq.DEQ: implicit gradients against a dense float64 solve of Eq. 2, phantom and unrolled
gradients, tuple states, eval budget, returned states, and option errors."""
import pytest
import torch

import cdeq
from cdeq.backward import NonFiniteBackwardError
from cdeq.config import UnknownOptionError

F64 = torch.float64


def problem(seed=0, B=3, N=5, gain=0.6):
    """f(z) = tanh(z W^T + b + u): a contraction, with parameters W, b and a closed-over u."""
    g = torch.Generator().manual_seed(seed)
    W = (gain * torch.randn(N, N, generator=g, dtype=F64) / N**0.5).requires_grad_()
    b = torch.randn(N, generator=g, dtype=F64).requires_grad_()
    u = torch.randn(B, N, generator=g, dtype=F64).requires_grad_()
    c = torch.randn(B, N, generator=g, dtype=F64)
    return (lambda z: torch.tanh(z @ W.T + b + u)), (W, b, u), c


def exact_fixed_point(f, z, iters=300):
    with torch.no_grad():
        for _ in range(iters):
            z = f(z)
    return z


def dense_implicit_grads(f, z_star, inputs, dl_dz):
    """dL/dtheta = dL/dz* (I - J)^{-1} df/dtheta (Eq. 2) with per-sample dense Jacobians."""
    z = z_star.detach().requires_grad_()
    J = torch.autograd.functional.jacobian(lambda y: f(y).sum(0), z).permute(1, 0, 2)  # (B, out, in)
    eye = torch.eye(J.shape[-1], dtype=J.dtype)
    g = torch.linalg.solve((eye - J).transpose(1, 2), dl_dz.unsqueeze(-1)).squeeze(-1)
    return torch.autograd.grad(f(z), inputs, g)


def grads_of(deq, f, inputs, c, z0):
    z, info = deq(f, z0)
    grads = torch.autograd.grad((z * c).sum(), inputs)
    return z, info, grads


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("f_solver,b_solver", [("anderson", "anderson"), ("fixed_point", "fixed_point"),
                                               ("broyden", "anderson")])
def test_implicit_gradients_match_dense_solve_float64(f_solver, b_solver):
    f, inputs, c = problem()
    deq = cdeq.DEQ(f_solver=f_solver, f_max_iter=200, f_tol=1e-13, b_solver=b_solver, b_max_iter=200, b_tol=1e-13)
    z, info, grads = grads_of(deq, f, inputs, c, torch.zeros(3, 5, dtype=F64))
    z_star = exact_fixed_point(f, torch.zeros(3, 5, dtype=F64))
    assert torch.allclose(z, z_star, atol=1e-11)
    exact = dense_implicit_grads(f, z_star, inputs, c)
    for name, got, want in zip(("W", "b", "u (closed over)"), grads, exact):
        assert rel_err(got, want) < 1e-6, name
    assert info.backward_residual.shape == (3,) and bool((info.backward_residual < 1e-10).all())
    assert info.backward_nfe > 0


def test_backward_residual_is_filled_only_when_backward_runs():
    f, inputs, c = problem()
    z, info = cdeq.DEQ(f_solver="anderson")(f, torch.zeros(3, 5, dtype=F64))
    assert info.backward_residual is None
    (z * c).sum().backward()
    assert info.backward_residual is not None and torch.isfinite(info.backward_residual).all()


def test_implicit_tuple_state_matches_dense_solve():
    g = torch.Generator().manual_seed(1)
    A = (0.3 * torch.randn(4, 4, generator=g, dtype=F64)).requires_grad_()
    u = torch.randn(2, 4, generator=g, dtype=F64).requires_grad_()

    def f(z):  # parts (B, 3) and (B, 1): coupled through one linear map of their concatenation
        h = torch.tanh(torch.cat([z[0], z[1].reshape(2, 1)], 1) @ A.T + u)
        return h[:, :3], h[:, 3:].reshape(2, 1)

    def f_flat(y):
        a, b = f((y[:, :3], y[:, 3:]))
        return torch.cat([a, b], 1)

    c = torch.randn(2, 4, generator=g, dtype=F64)
    deq = cdeq.DEQ(f_max_iter=100, f_tol=1e-13, b_max_iter=100, b_tol=1e-13)
    z, info = deq(f, (torch.zeros(2, 3, dtype=F64), torch.zeros(2, 1, dtype=F64)))
    assert isinstance(z, tuple) and z[0].shape == (2, 3) and z[1].shape == (2, 1)
    got = torch.autograd.grad((z[0] * c[:, :3]).sum() + (z[1] * c[:, 3:]).sum(), (A, u))
    exact = dense_implicit_grads(f_flat, exact_fixed_point(f_flat, torch.zeros(2, 4, dtype=F64)), (A, u), c)
    for a, b in zip(got, exact):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("steps,tau", [(1, 1.0), (3, 0.6), (8, 0.9)])
def test_phantom_gradient_is_a_descent_direction(steps, tau):
    f, inputs, c = problem(seed=2)
    deq = cdeq.DEQ(f_max_iter=100, f_tol=1e-12, backward="phantom", phantom_steps=steps, tau=tau)
    _, _, grads = grads_of(deq, f, inputs, c, torch.zeros(3, 5, dtype=F64))
    exact = dense_implicit_grads(f, exact_fixed_point(f, torch.zeros(3, 5, dtype=F64)), inputs, c)
    inner = sum((a * b).sum() for a, b in zip(grads, exact))
    assert inner > 0


def test_phantom_gradient_approaches_implicit_with_many_steps():
    f, inputs, c = problem(seed=3)
    exact = dense_implicit_grads(f, exact_fixed_point(f, torch.zeros(3, 5, dtype=F64)), inputs, c)
    errors = []
    for steps in (1, 40):
        deq = cdeq.DEQ(f_max_iter=100, f_tol=1e-12, backward="phantom", phantom_steps=steps)
        _, _, grads = grads_of(deq, f, inputs, c, torch.zeros(3, 5, dtype=F64))
        errors.append(max(rel_err(a, b) for a, b in zip(grads, exact)))
    assert errors[1] < 1e-8 < errors[0]


def unrolled_by_hand(f, z0, steps, tau):
    z = z0
    for _ in range(steps):
        z = tau * f(z) + (1 - tau) * z
    return z


@pytest.mark.parametrize("checkpoint", [False, True])
def test_unroll_gradients_match_autograd_through_the_same_steps(checkpoint):
    f, inputs, c = problem(seed=4)
    z0 = torch.randn(3, 5, dtype=F64, requires_grad=True)
    deq = cdeq.DEQ(backward="unroll", f_max_iter=7, f_tol=0.0, tau=0.7, checkpoint=checkpoint)
    z, info = deq(f, z0)
    got = torch.autograd.grad((z * c).sum(), inputs + (z0,))
    want_z = unrolled_by_hand(f, z0, 7, 0.7)
    want = torch.autograd.grad((want_z * c).sum(), inputs + (z0,))
    assert info.nfe == 7 and torch.allclose(z, want_z, rtol=0, atol=1e-14)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_unroll_rejects_another_solver():
    with pytest.raises(ValueError, match="backward='unroll'.*f_solver must be 'fixed_point'"):
        cdeq.DEQ(backward="unroll", f_solver="anderson")


def test_eval_max_iter_is_the_budget_in_eval_mode():
    f, _, _ = problem()
    calls = []
    deq = cdeq.DEQ(f_solver="fixed_point", f_max_iter=9, eval_max_iter=4, f_tol=0.0)
    counted = lambda z: calls.append(1) or f(z)  # noqa: E731
    with torch.no_grad():
        _, train_info = deq(counted, torch.zeros(3, 5, dtype=F64))
        deq.eval()
        calls.clear()
        _, eval_info = deq(counted, torch.zeros(3, 5, dtype=F64))
    assert train_info.nfe == 9 and eval_info.nfe == 4
    assert len(calls) == 4 + 1  # the solve's calls and its residual check, nothing else without grad


def test_zero_budget_with_phantom_steps_is_bptt():
    f, inputs, c = problem(seed=5)
    z0 = torch.zeros(3, 5, dtype=F64)
    deq = cdeq.DEQ(f_max_iter=0, backward="phantom", phantom_steps=6, tau=1.0)
    z, info = deq(f, z0)
    got = torch.autograd.grad((z * c).sum(), inputs)
    want_z = unrolled_by_hand(f, z0, 6, 1.0)
    want = torch.autograd.grad((want_z * c).sum(), inputs)
    assert info.nfe == 0 and torch.allclose(z, want_z)
    for a, b in zip(got, want):
        assert torch.allclose(a, b)


def test_implicit_returned_states_keep_solver_values_and_phantom_gradients():
    f, (W, b, u), c = problem(seed=6)
    deq = cdeq.DEQ(f_solver="fixed_point", f_max_iter=20, f_tol=0.0, phantom_steps=2, tau=0.5)
    z, info = deq(f, torch.zeros(3, 5, dtype=F64), return_steps=[1, 3])
    _, ref = cdeq.solve(f, torch.zeros(3, 5, dtype=F64), solver="fixed_point", max_iter=20, tol=0.0,
                        return_states=[1, 3])
    assert len(info.states) == 2
    for s, r in zip(info.states, ref.states):
        assert torch.equal(s.detach(), r)
    got = torch.autograd.grad((info.states[1] * c).sum(), (W, u))
    z3 = ref.states[1]
    want = torch.autograd.grad((unrolled_by_hand(f, z3, 2, 0.5) * c).sum(), (W, u))
    for a, b_ in zip(got, want):
        assert torch.allclose(a, b_)


def test_unroll_returned_states_are_the_iterates_with_their_gradients():
    f, (W, b, u), c = problem(seed=7)
    deq = cdeq.DEQ(backward="unroll", f_max_iter=6, f_tol=0.0)
    _, info = deq(f, torch.zeros(3, 5, dtype=F64), return_steps=[0, 2, 6])
    z2 = unrolled_by_hand(f, torch.zeros(3, 5, dtype=F64), 2, 1.0)
    assert torch.equal(info.states[0], torch.zeros(3, 5, dtype=F64))
    assert torch.allclose(info.states[1], z2)
    got = torch.autograd.grad((info.states[1] * c).sum(), W)[0]
    assert torch.allclose(got, torch.autograd.grad((z2 * c).sum(), W)[0])


def test_config_return_steps_apply_in_training_only():
    f, _, _ = problem()
    deq = cdeq.DEQ(f_solver="fixed_point", f_max_iter=5, f_tol=0.0, return_steps=[2, 5])
    with torch.no_grad():
        _, info = deq(f, torch.zeros(3, 5, dtype=F64))
        assert len(info.states) == 2
        _, info = deq.eval()(f, torch.zeros(3, 5, dtype=F64))
        assert info.states is None


def test_return_steps_out_of_range_is_an_error():
    f, _, _ = problem()
    with pytest.raises(ValueError, match=r"return_steps: steps must be ints in \[0, max_iter=5\], got \[6\]"):
        cdeq.DEQ(f_max_iter=5)(f, torch.zeros(3, 5, dtype=F64), return_steps=[2, 6])


def test_exploding_backward_raises_a_clear_error():
    w = torch.tensor(2.5, dtype=F64, requires_grad=True)
    deq = cdeq.DEQ(f_solver="fixed_point", f_max_iter=3, f_tol=0.0, b_solver="fixed_point", b_max_iter=50)
    z, _ = deq(lambda z: w * z, torch.ones(2, 3, dtype=F64))
    with pytest.warns(RuntimeWarning), pytest.raises(NonFiniteBackwardError, match=r"diverged .* sample\(s\) \[0, 1\]"):
        z.sum().backward()


def test_non_finite_incoming_gradient_raises():
    f, _, _ = problem()
    z, _ = cdeq.DEQ()(f, torch.zeros(3, 5, dtype=F64))
    with pytest.raises(NonFiniteBackwardError, match="incoming gradient dL/dz\\* is not finite"):
        (z * float("nan")).sum().backward()


def test_unknown_option_names_it_and_lists_valid_ones():
    with pytest.raises(UnknownOptionError, match="DEQ: unknown option 'f_slover'. Did you mean 'f_solver'") as e:
        cdeq.DEQ(f_slover="anderson")
    assert "b_max_iter" in str(e.value) and "phantom_steps" in str(e.value)
    with pytest.raises(TypeError, match="unknown option 'norm_type'"):  # a DEQConfig field, not a DEQ option
        cdeq.DEQ(norm_type="weight")


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match=r"backward: expected one of \('implicit', 'phantom', 'unroll'\), got 'ift'"):
        cdeq.DEQ(backward="ift")
    with pytest.raises(ValueError, match=r"tau: expected a number in \(0.0, 1.0\], got 1.5"):
        cdeq.DEQ(tau=1.5)
    with pytest.raises(ValueError, match="max_iter: expected an integer >= 0, got -1"):
        cdeq.DEQ()(lambda z: z, torch.zeros(1, 2), max_iter=-1)


def test_from_config():
    cfg = cdeq.DEQConfig(f_solver="fixed_point_iter", f_max_iter=11, backward="phantom", phantom_steps=4,
                         tau=0.5, norm_type="spectral_norm")
    deq = cdeq.DEQ.from_config(cfg)
    assert deq.config.f_solver == "fixed_point" and deq.config.phantom_steps == 4 and deq.config.tau == 0.5
    assert deq.config.f_max_iter == 11
    with pytest.raises(TypeError, match="expected a cdeq.DEQConfig, got dict"):
        cdeq.DEQ.from_config({"f_max_iter": 3})


def test_phantom_returned_states_are_advanced_and_differentiable():
    f, (W, b, u), c = problem(seed=8)
    deq = cdeq.DEQ(f_solver="fixed_point", f_max_iter=10, f_tol=0.0, backward="phantom", phantom_steps=2, tau=0.5)
    _, info = deq(f, torch.zeros(3, 5, dtype=F64), return_steps=[3])
    _, ref = cdeq.solve(f, torch.zeros(3, 5, dtype=F64), solver="fixed_point", max_iter=10, tol=0.0, return_states=[3])
    want = unrolled_by_hand(f, ref.states[0], 2, 0.5)
    assert torch.allclose(info.states[0], want)
    got = torch.autograd.grad((info.states[0] * c).sum(), u)[0]
    assert torch.allclose(got, torch.autograd.grad((want * c).sum(), u)[0])


class NormedDEQ(cdeq.DEQModel):
    """inject -> tanh layer -> readout in float64, with weight-normalised layer weights (the gradient
    checks need a normalised layer; the shared toys of conftest have none)."""

    feature_dim = -1

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(3, 4).double()
        self.mix = torch.nn.Linear(4, 4).double()
        self.head = torch.nn.Linear(4, 2).double()
        cdeq.apply_norm(self.mix)
        self.set_deq(cdeq.DEQ(f_max_iter=40, f_tol=1e-10))

    def inject(self, x):
        return self.encoder(x)

    def layer(self, z, u):
        return torch.tanh(0.5 * self.mix(z) + u)

    def readout(self, z):
        return self.head(z)

    def init_state(self, u):
        return torch.zeros_like(u)


def test_gradients_reach_every_parameter_of_a_deq_model():
    torch.manual_seed(0)
    model = NormedDEQ()
    logits, info = model(torch.randn(5, 3, dtype=F64), return_steps=[2])
    loss = logits.square().sum() + model.readout(info.states[0]).sum()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert {"mix.weight_v", "mix.weight_g"} <= {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("backward", ["implicit", "phantom", "unroll"])
def test_info_states_end_with_the_final_state(backward):
    """return_steps "all", or steps ending at (or past) the last solver step, end info.states with the
    state the solve returned (for phantom, advanced by the same phantom steps as z)."""
    f, _, _ = problem(seed=9)
    kw = dict(f_solver="fixed_point", f_max_iter=12, f_tol=1e-6, backward=backward)
    for steps in ("all", [2, 12]):
        z, info = cdeq.DEQ(**kw)(f, torch.zeros(3, 5, dtype=F64), return_steps=steps)
        assert info.nfe < 12 or steps == "all"
        assert torch.allclose(info.states[-1], z, atol=1e-12), (steps, backward)


def test_per_sample_false_reaches_the_deq_and_its_backward():
    g = torch.Generator().manual_seed(3)
    W = (0.3 * torch.randn(4, 4, generator=g, dtype=F64)).requires_grad_()
    A = 0.2 * torch.randn(6, 6, generator=g, dtype=F64)
    b = torch.randn(4, 6, generator=g, dtype=F64)
    b[0] = 0
    f = lambda z: torch.tanh(W @ z @ A + b)  # noqa: E731  rows coupled: dim 0 is not a batch
    deq = cdeq.DEQ(f_solver="anderson", f_max_iter=60, f_tol=1e-10, b_max_iter=60, b_tol=1e-10, per_sample=False)
    z, info = deq(f, torch.zeros(4, 6, dtype=F64))
    assert info.converged.all() and torch.allclose(z, f(z), atol=1e-8)
    z.sum().backward()
    assert info.backward_residual.max() <= 1e-10
    with pytest.warns(RuntimeWarning, match="Per-sample stopping assumes independent batch rows"):
        cdeq.DEQ(f_solver="anderson", f_max_iter=60, f_tol=1e-10)(f, torch.zeros(4, 6, dtype=F64))
