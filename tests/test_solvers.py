"""Tests of cdeq.solve and the fixed_point / anderson / broyden solvers (CPU, float64 references)."""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cdeq
from cdeq.solvers import base
from cdeq.solvers.anderson import anderson
from cdeq.solvers.broyden import broyden
from cdeq.solvers.fixed_point import fixed_point

SOLVERS = ["fixed_point", "anderson", "broyden"]
FLAT = {"fixed_point": fixed_point, "anderson": anderson, "broyden": broyden}


def linear_problem(B=3, N=40, rho=0.95, seed=0, dtype=torch.float64):
    """f(z) = A z + b with symmetric A, eigenvalues in [-0.5, rho]; returns f and z* = (I - A)^{-1} b."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(B, N, N, generator=g, dtype=torch.float64))
    ev = torch.linspace(-0.5, rho, N, dtype=torch.float64).expand(B, N)
    A = Q @ torch.diag_embed(ev) @ Q.transpose(1, 2)
    b = torch.randn(B, N, generator=g, dtype=torch.float64)
    z_star = torch.linalg.solve(torch.eye(N, dtype=torch.float64) - A, b.unsqueeze(2)).squeeze(2)

    def f(z):
        return (torch.bmm(A, z.double().unsqueeze(2)).squeeze(2) + b).to(dtype)

    return f, z_star


def tanh_problem(B=3, N=30, scale=0.8, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, N, generator=g, dtype=torch.float64)
    W = scale * W / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(B, N, generator=g, dtype=torch.float64)
    return lambda z: torch.tanh(z @ W.T + x)


def iterate(f, z, k):
    for _ in range(k):
        z = f(z)
    return z


class Counted:
    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, z):
        self.calls += 1
        return self.f(z)


@pytest.mark.parametrize("solver", SOLVERS)
def test_reaches_linear_fixed_point(solver):
    f, z_star = linear_problem()
    z, info = cdeq.solve(f, torch.zeros_like(z_star), solver=solver, max_iter=400, tol=1e-10)
    assert info.converged.all()
    assert (z - z_star).abs().max() < 1e-7
    assert (info.rel_residual <= 1e-10).all()


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.3, 0.9), solver=st.sampled_from(SOLVERS))
def test_reaches_fixed_point_of_random_contraction(seed, scale, solver):
    f = tanh_problem(scale=scale, seed=seed)
    z_ref = iterate(f, torch.zeros(3, 30, dtype=torch.float64), 600)
    z, info = cdeq.solve(f, torch.zeros(3, 30, dtype=torch.float64), solver=solver, max_iter=300, tol=1e-11)
    assert info.converged.all()
    assert (z - z_ref).abs().max() < 1e-8


@pytest.mark.parametrize("solver", SOLVERS)
def test_tuple_state(solver):
    f_flat, z_star = linear_problem(B=2, N=14, rho=0.8)

    def f(z):
        out = f_flat(torch.cat([z[0], z[1].reshape(2, -1)], dim=1))
        return out[:, :4], out[:, 4:].reshape(2, 2, 5)

    z0 = (torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 2, 5, dtype=torch.float64))
    z, info = cdeq.solve(f, z0, solver=solver, max_iter=200, tol=1e-10, return_states=[0, 3])
    assert isinstance(z, tuple) and z[1].shape == (2, 2, 5)
    assert (torch.cat([z[0], z[1].reshape(2, -1)], 1) - z_star).abs().max() < 1e-7
    assert isinstance(info.states[1], tuple) and info.states[1][1].shape == (2, 2, 5)


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_accelerated_solvers_need_fewer_nfe(solver):
    f, z_star = linear_problem(rho=0.95)
    z0 = torch.zeros_like(z_star)
    _, fp = cdeq.solve(f, z0, solver="fixed_point", max_iter=1000, tol=1e-8)
    _, acc = cdeq.solve(f, z0, solver=solver, max_iter=1000, tol=1e-8)
    assert fp.converged.all() and acc.converged.all()
    assert acc.nfe < 0.4 * fp.nfe


@pytest.mark.parametrize("solver", SOLVERS)
def test_nfe_counts_calls_and_fixed_budget(solver):
    f = Counted(tanh_problem())
    z, info = cdeq.solve(f, torch.zeros(3, 30, dtype=torch.float64), solver=solver, max_iter=7, tol=0)
    assert info.nfe == 7 and f.calls == 8  # + the check call
    assert info.steps.tolist() == [7, 7, 7]
    f.calls = 0
    z, info = cdeq.solve(f, torch.zeros(3, 30, dtype=torch.float64), solver=solver, max_iter=500, tol=1e-6)
    assert f.calls == info.nfe + 1 and info.nfe == int(info.steps.max()) < 500


def test_fixed_point_iterates_are_powers_of_f():
    f = tanh_problem()
    z0 = torch.randn(3, 30, dtype=torch.float64)
    z, info = cdeq.solve(f, z0, solver="fixed_point", max_iter=6, tol=0, return_states="all")
    assert torch.equal(z, iterate(f, z0, 6))
    assert len(info.states) == 7 and torch.equal(info.states[0], z0)
    for k, s in enumerate(info.states):
        assert torch.equal(s, iterate(f, z0, k))


def test_anderson_with_window_one_is_fixed_point_iteration():
    f = tanh_problem()
    z0 = torch.randn(3, 30, dtype=torch.float64)
    z, _ = cdeq.solve(f, z0, solver="anderson", m=1, max_iter=5, tol=0)
    assert torch.equal(z, iterate(f, z0, 5))


def test_anderson_second_iterate_matches_closed_form():
    """With two residuals and lam = 0, Eq. 9 gives alpha_1 = g0.(g0 - g1) / ||g0 - g1||^2."""
    f = tanh_problem()
    z0 = torch.randn(3, 30, dtype=torch.float64)
    z1 = f(z0)
    g0, g1 = z1 - z0, f(z1) - z1
    a1 = ((g0 * (g0 - g1)).sum(1) / ((g0 - g1) ** 2).sum(1)).unsqueeze(1)
    for tau in (1.0, 0.6):
        z1 = torch.lerp(z0, f(z0), tau)
        g1 = f(z1) - z1
        a1 = ((g0 * (g0 - g1)).sum(1) / ((g0 - g1) ** 2).sum(1)).unsqueeze(1)
        expected = (1 - a1) * (z0 + tau * g0) + a1 * (z1 + tau * g1)
        z, _ = cdeq.solve(f, z0, solver="anderson", max_iter=2, tol=0, lam=0.0, tau=tau)
        assert (z - expected).abs().max() < 1e-10


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_matches_fixed_point_iteration_after_convergence(solver):
    f64 = tanh_problem(scale=0.9)
    f = lambda z: f64(z.double()).float()  # noqa: E731
    z0 = torch.zeros(3, 30)
    z_fp, _ = cdeq.solve(f, z0, solver="fixed_point", max_iter=500, tol=1e-7)
    z, info = cdeq.solve(f, z0, solver=solver, max_iter=200, tol=1e-7)
    assert info.nfe < 200 and (z - z_fp).abs().max() <= 1e-5


@pytest.mark.parametrize("solver", SOLVERS)
def test_per_sample_convergence_freezes_early_samples(solver):
    f, z_star = linear_problem(B=3, rho=0.9)
    z0 = torch.zeros_like(z_star)
    z0[0] = z_star[0] + 1e-7 * torch.randn_like(z_star[0])  # sample 0 starts next to its fixed point
    z, info = cdeq.solve(f, z0, solver=solver, max_iter=300, tol=1e-9, return_states="all")
    assert info.converged.all()
    assert info.steps[0] < info.steps[1:].min() and info.nfe == int(info.steps.max())
    k0 = int(info.steps[0])
    frozen = torch.stack([s[0] for s in info.states[k0 - 1:]])
    assert (frozen == frozen[0]).all()  # sample 0 stops changing at the iterate that met tol
    assert not torch.equal(info.states[k0 - 1][1], info.states[-1][1])
    assert torch.equal(info.states[-1], z)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_returned_residual_is_that_of_returned_state(solver, stop_mode):
    f = tanh_problem()
    z, info = cdeq.solve(f, torch.zeros(3, 30, dtype=torch.float64), solver=solver, max_iter=9, tol=1e-4,
                         stop_mode=stop_mode)
    fz = f(z)
    abs_r = (fz - z).norm(dim=1)
    assert torch.allclose(info.abs_residual, abs_r, rtol=1e-12, atol=0)
    assert torch.allclose(info.rel_residual, abs_r / fz.norm(dim=1), rtol=1e-12, atol=0)
    r = info.rel_residual if stop_mode == "rel" else info.abs_residual
    assert torch.equal(info.converged, r <= 1e-4)


@pytest.mark.parametrize("solver", SOLVERS)
def test_trace_and_selected_states(solver):
    f = tanh_problem()
    z0 = torch.zeros(3, 30, dtype=torch.float64)
    z, info = cdeq.solve(f, z0, solver=solver, max_iter=6, tol=0, trace=True, return_states="all")
    assert info.trace.shape == (6, 3)
    for k in range(6):
        s = info.states[k]
        assert torch.allclose(info.trace[k], ((f(s) - s).norm(dim=1) / f(s).norm(dim=1)).float())
    _, sel = cdeq.solve(f, z0, solver=solver, max_iter=6, tol=0, return_states=[4, 1])
    assert torch.equal(sel.states[0], info.states[4]) and torch.equal(sel.states[1], info.states[1])
    # indices past the last NFE give the final (frozen) state
    z, early = cdeq.solve(f, z0, solver=solver, max_iter=50, tol=1e-3, return_states=[50])
    assert early.nfe < 50 and torch.equal(early.states[0], z)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_low_precision_states(solver, dtype, tol):
    f, z_star = linear_problem(rho=0.9, dtype=dtype)
    z, info = cdeq.solve(f, torch.zeros(3, 40, dtype=dtype), solver=solver, max_iter=200, tol=tol)
    assert z.dtype == dtype and info.converged.all() and info.nfe < 200
    assert ((z.double() - z_star).norm(dim=1) / z_star.norm(dim=1)).max() < 20 * tol


@pytest.mark.parametrize("solver", SOLVERS)
def test_fixed_budget_makes_no_host_sync(solver, monkeypatch):
    """On an accelerator (simulated: host reads declared costly) a fixed budget never reads a tensor on
    the host; the CPU reads one flag per step, since that is free there."""
    f = tanh_problem()
    z0 = torch.zeros(3, 30, dtype=torch.float64)
    on_cpu, _ = FLAT[solver](f, z0, tol=0.0, max_iter=8, stop_mode="rel", return_states=None, trace=True)
    monkeypatch.setattr(base, "host_reads_are_free", lambda device: False)

    def sync(*args):
        raise AssertionError("host-device synchronisation")

    for name in ("__bool__", "item", "tolist", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    kw = dict(max_iter=8, stop_mode="rel", return_states=None, trace=True)
    z, info = FLAT[solver](f, z0, tol=0.0, **kw)
    assert info.nfe == 8 and torch.equal(z, on_cpu)  # the select over the batch changes nothing
    with pytest.raises(AssertionError, match="synchronisation"):  # the probe does detect syncs
        FLAT[solver](f, z0, tol=1e-3, **kw)


@pytest.mark.parametrize("solver", SOLVERS)
def test_divergence_freezes_sample_at_last_finite_iterate(solver):
    healthy = tanh_problem(B=3, N=5)

    def f(z):
        f.calls += 1
        out = healthy(z)
        out[1] = float("inf")  # sample 1's f is never finite: frozen at z_0
        if f.calls >= 3:
            out[2] = float("nan")  # sample 2's f fails from the 3rd call: frozen at z_2
        return out

    f.calls = 0
    z0 = torch.full((3, 5), 0.1, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"sample\(s\) \[1, 2\] diverged"):
        z, info = cdeq.solve(f, z0, solver=solver, max_iter=100, tol=1e-8)
    assert info.diverged.tolist() == [False, True, True]
    assert info.converged.tolist() == [True, False, False]
    z2, _ = cdeq.solve(healthy, z0, solver=solver, max_iter=2, tol=0)
    assert torch.equal(z[1], z0[1]) and torch.equal(z[2], z2[2])
    assert (healthy(z)[0] - z[0]).norm() < 1e-7


def test_growing_residual_marks_divergence():
    z0 = torch.ones(2, 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"sample\(s\) \[0, 1\] diverged"):
        z, info = cdeq.solve(lambda z: 2 * z + 1, z0, solver="fixed_point", max_iter=100)
    assert info.diverged.all() and info.nfe < 20 and torch.isfinite(z).all()


def test_anderson_singular_system_falls_back_to_damped_step():
    d = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)  # g constant: G G^T singular
    z, info = cdeq.solve(lambda z: z + d, torch.zeros(2, 2, dtype=torch.float64), solver="anderson",
                         lam=0.0, tau=0.5, max_iter=4, tol=0)
    assert torch.allclose(z, 2 * d)  # four steps of z + 0.5 g
    assert not info.diverged.any()


def test_anderson_zero_residual_with_ridge_stays_put():
    """With lam > 0 a sample whose residuals are all zero has H = 0; it must keep its state, not NaN."""
    d = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    z, info = cdeq.solve(lambda z: z + d, torch.zeros(2, 2), solver="anderson", lam=1e-4, max_iter=6, tol=0)
    assert torch.isfinite(z).all() and torch.equal(z[1], torch.zeros(2))
    assert not info.diverged.any()


def test_register_solver():
    def one_step(f, z0, *, max_iter, tol, stop_mode, return_states, trace, gain=1.0):
        return z0 + gain * (f(z0) - z0), cdeq.SolverInfo(nfe=1)

    cdeq.register_solver("test_one_step", one_step)
    assert "test_one_step" in cdeq.available_solvers()
    f = tanh_problem()
    z0 = torch.zeros(3, 30, dtype=torch.float64)
    z, info = cdeq.solve(f, z0, solver="test_one_step", gain=0.5)
    assert torch.equal(z, 0.5 * f(z0)) and info.nfe == 1 and info.steps.tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['gian'\]; valid options: \['gain'\]"):
        cdeq.solve(f, z0, solver="test_one_step", gian=0.5)
    with pytest.raises(ValueError, match="exists; pass overwrite=True"):
        cdeq.register_solver("test_one_step", one_step)
    cdeq.register_solver("test_one_step", one_step, overwrite=True)
    with pytest.raises(TypeError, match=r"must accept the keyword arguments \['max_iter'"):
        cdeq.register_solver("test_bad", lambda f, z0: (z0, None))


def _f(z):
    return 0.5 * z


@pytest.mark.parametrize("call,error,match", [
    (lambda: cdeq.solve(_f, torch.zeros(3)), ValueError, r"z0: expected a batched state"),
    (lambda: cdeq.solve(_f, (torch.zeros(2, 3), torch.zeros(3, 3))), ValueError, r"z0\[1\]: batch size 3"),
    (lambda: cdeq.solve(lambda z: z[:, :2], torch.zeros(2, 3)), ValueError,
     r"f\(z\): expected shape \(2, 3\) \(that of z0\), got \(2, 2\)"),
    (lambda: cdeq.solve(lambda z: z.double(), torch.zeros(2, 3)), TypeError,
     r"f\(z\): expected dtype torch.float32 \(that of z0\), got torch.float64"),
    (lambda: cdeq.solve(lambda z: z[0], (torch.zeros(2, 3), torch.zeros(2, 1))), ValueError,
     r"f\(z\): expected a state with the structure of z0 \(2 part\(s\), tuple=True\), got 1 part\(s\), tuple=False"),
    (lambda: cdeq.solve(_f, torch.tensor([[0.0], [float("nan")], [float("inf")]])), ValueError,
     r"z0 contains NaN or Inf in sample\(s\) \[1, 2\]"),
    (lambda: cdeq.solve(_f, torch.zeros(2, 3), solver="newton"), ValueError,
     r"unknown solver 'newton'; valid solvers: \['anderson', 'broyden', 'fixed_point'"),
    (lambda: cdeq.solve(_f, torch.zeros(2, 3), solver="anderson", beta=0.5), ValueError,
     r"solver 'anderson': unknown option\(s\) \['beta'\]; valid options: \['m', 'tau', 'lam', 'history'\]"),
    (lambda: cdeq.solve(_f, torch.zeros(2, 3), solver="fixed_point", m=3), ValueError,
     r"unknown option\(s\) \['m'\]; valid options: \['tau'\]"),
    (lambda: cdeq.solve(_f, torch.zeros(2, 3), max_iter=0), ValueError, r"max_iter: expected an int >= 1"),
    (lambda: cdeq.solve(_f, torch.zeros(2, 3), tol=-1e-3), ValueError, r"tol: expected a finite number >= 0"),
    (lambda: cdeq.solve(_f, torch.zeros(2, 3), stop_mode="max"), ValueError, r"stop_mode: expected one of"),
    (lambda: cdeq.solve(_f, torch.zeros(2, 3), return_states="some"), ValueError, r"return_states: expected"),
    (lambda: cdeq.solve(_f, torch.zeros(2, 3), max_iter=3, return_states=[4]), ValueError,
     r"return_states: iterate indices must be ints in \[0, max_iter=3\], got \[4\]"),
    (lambda: cdeq.solve(_f, torch.zeros(2, 3), trace=1), ValueError, r"trace: expected a bool"),
    (lambda: cdeq.solve(_f, torch.zeros(2, 3), solver="anderson", m=0), ValueError, r"m: expected an int >= 1"),
    (lambda: cdeq.solve(_f, torch.zeros(2, 3), solver="broyden", m=2.5), ValueError, r"m: expected an int >= 1"),
    (lambda: cdeq.solve(_f, torch.zeros(2, 3), solver="anderson", tau=0), ValueError, r"tau: expected a damping"),
    (lambda: cdeq.solve(_f, torch.zeros(2, 3), solver="fixed_point", tau=1.5), ValueError, r"tau: expected"),
    (lambda: cdeq.solve(_f, torch.zeros(2, 3), solver="anderson", lam=-1.0), ValueError, r"lam: expected"),
])
def test_errors_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_no_warning_without_divergence():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cdeq.solve(tanh_problem(), torch.zeros(3, 30, dtype=torch.float64), max_iter=5)


def test_check_residual_off_makes_exactly_max_iter_calls():
    f = Counted(tanh_problem())
    z, info = cdeq.solve(f, torch.zeros(3, 30, dtype=torch.float64), max_iter=4, tol=0, check_residual=False)
    assert f.calls == info.nfe == 4
    assert info.abs_residual is None and info.rel_residual is None and info.converged is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lam", [1e-4, 0.0])
def test_anderson_stays_at_an_exact_fixed_point(dtype, lam):
    """Every g_i = 0 makes G G^T = 0: the ridge floor (lam > 0) or the singular-solve fallback
    (lam = 0) must keep the iterate, not turn it into NaN, in a fixed-budget solve."""
    z0 = torch.linspace(-1, 1, 30, dtype=dtype).reshape(3, 10)
    z, info = cdeq.solve(lambda z: z.clone(), z0, solver="anderson", max_iter=8, tol=0, lam=lam)
    torch.testing.assert_close(z, z0)  # equal weights on equal iterates: equal up to rounding
    assert info.nfe == 8 and not info.diverged.any() and bool(info.converged.all())


def coupled_rows_problem():
    """A state (hidden, nodes) whose dim 0 is not a batch: f mixes the rows (W on the left), and
    row 0 has f(0) = 0, so it meets tol at the first step although the fixed point is not 0 there."""
    g = torch.Generator().manual_seed(3)
    W = 0.3 * torch.randn(4, 4, generator=g, dtype=torch.float64)
    A = 0.2 * torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(4, 6, generator=g, dtype=torch.float64)
    b[0] = 0
    return lambda z: torch.tanh(W @ z @ A + b)


@pytest.mark.parametrize("solver", SOLVERS)
def test_coupled_rows_warn_and_per_sample_false_stops_on_the_whole_batch(solver):
    f = coupled_rows_problem()
    z0 = torch.zeros(4, 6, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"sample\(s\) \[0\] met tol=1e-08 .* Per-sample stopping assumes "
                                            r"independent batch rows.*per_sample=False"):
        _, info = cdeq.solve(f, z0, solver=solver, max_iter=100, tol=1e-8)
    assert info.met_tol[0] and not info.converged[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z, info = cdeq.solve(f, z0, solver=solver, max_iter=100, tol=1e-8, per_sample=False)
    assert info.converged.all() and (info.steps == info.nfe).all()
    assert torch.allclose(z, f(z), atol=1e-7)


def test_per_sample_false_needs_a_solver_that_takes_it():
    def plain(f, z0, *, max_iter, tol, stop_mode, return_states, trace):
        return f(z0), cdeq.SolverInfo(nfe=1)

    cdeq.register_solver("plain_no_per_sample", plain)
    try:
        with pytest.raises(ValueError, match="per_sample=False: solver 'plain_no_per_sample' does not take"):
            cdeq.solve(lambda z: z, torch.zeros(2, 3), solver="plain_no_per_sample", per_sample=False)
        with pytest.raises(ValueError, match="per_sample: expected True or False, got 0"):
            cdeq.solve(lambda z: z, torch.zeros(2, 3), per_sample=0)
    finally:
        base._REGISTRY.pop("plain_no_per_sample")


def test_torchdeq_solver_names_and_a_zero_budget():
    f, z_star = linear_problem(N=10, rho=0.5)
    z, info = cdeq.solve(f, torch.zeros(3, 10, dtype=torch.float64), solver="fixed_point_iter", max_iter=200,
                         tol=1e-12, trace=True)
    assert torch.allclose(z, z_star, atol=1e-10)
    assert info.abs_trace.shape == info.trace.shape == (info.nfe, 3)
    with pytest.raises(ValueError, match=r"max_iter: expected an int >= 1 .* use cdeq.DEQ\(f_max_iter=0\)"):
        cdeq.solve(f, torch.zeros(3, 10, dtype=torch.float64), max_iter=0)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("tuple_state", [False, True])
def test_a_fixed_budget_makes_no_host_sync_on_the_meta_device(solver, tuple_state):
    """tol=0 with check_residual=False reads nothing on the host (the meta device, which has no
    values, stands in for a CUDA-graph capture): no finiteness check of z0, no divergence warning."""
    W = torch.randn(12, 12, device="meta")
    if tuple_state:
        z0 = (torch.zeros(3, 4, 2, device="meta"), torch.zeros(3, 4, device="meta"))

        def f(z):
            flat = torch.tanh(torch.cat([z[0].flatten(1), z[1]], dim=1) @ W)
            return flat[:, :8].reshape(3, 4, 2), flat[:, 8:]
    else:
        z0 = torch.zeros(3, 12, device="meta")

        def f(z):
            return torch.tanh(z @ W)
    z, info = cdeq.solve(f, z0, solver=solver, max_iter=6, tol=0, check_residual=False, trace=True,
                         return_states="all")
    assert info.nfe == 6 and len(info.states) == 7 and info.trace.shape == (6, 3)
    assert all(p.device.type == "meta" for p in base.as_tuple(z))
    assert info.steps.device.type == "meta" and info.diverged.device.type == "meta"


def test_host_checks_gate_the_z0_check_and_are_validated():
    f, _ = linear_problem(B=2, N=5)
    z0 = torch.zeros(2, 5, dtype=torch.float64)
    z0[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):  # on the CPU the checks stay on for a fixed budget
        cdeq.solve(f, z0, max_iter=3, tol=0, check_residual=False)
    _, info = cdeq.solve(f, z0, max_iter=3, tol=0, check_residual=False, host_checks=False)
    assert info.diverged.tolist() == [False, True]  # still reported, only not read on the host
    with pytest.raises(RuntimeError, match="meta"):  # forced on, the meta device cannot answer
        cdeq.solve(torch.tanh, torch.zeros(2, 3, device="meta"), max_iter=2, tol=0, check_residual=False,
                   host_checks=True)
    with pytest.raises(ValueError, match="host_checks"):
        cdeq.solve(f, torch.zeros(2, 5, dtype=torch.float64), max_iter=2, host_checks="no")


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_anderson_history_continues_a_solve_exactly(tau):
    """Anderson from z_2 with the pairs (z_0, f(z_0)), (z_1, f(z_1)) as history makes the iterates
    of the solve from z_0 (the window wraps at m = 4 within the budget)."""
    f = tanh_problem(B=2, N=20, scale=0.95)
    z0 = torch.zeros(2, 20, dtype=torch.float64)
    _, full = cdeq.solve(f, z0, max_iter=7, tol=0, m=4, tau=tau, return_states="all")
    history = [(s, f(s)) for s in full.states[:2]]
    z, info = cdeq.solve(f, full.states[2], max_iter=5, tol=0, m=4, tau=tau, history=history)
    assert info.nfe == 5
    torch.testing.assert_close(z, full.states[7], rtol=0, atol=1e-12)


def test_anderson_history_is_checked_against_z0():
    f = tanh_problem(B=2, N=6)
    z0 = torch.zeros(2, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"history\[0\] f\(z\): expected shape"):
        cdeq.solve(f, z0, max_iter=2, history=[(z0, torch.zeros(2, 5, dtype=torch.float64))])
    with pytest.raises(ValueError, match=r"history\[0\]: expected a pair"):
        cdeq.solve(f, z0, max_iter=2, history=[z0])
    with pytest.raises(ValueError, match="unknown option"):
        cdeq.solve(f, z0, solver="broyden", max_iter=2, history=[(z0, f(z0))])
