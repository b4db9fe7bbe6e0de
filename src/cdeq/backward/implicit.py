"""Implicit differentiation of a fixed point (torchdeq paper Eq. 2-3).

For z* = f(z*) the gradient of a loss L is dL/dtheta = g^T df(z*)/dtheta with g solving the
linear fixed-point system g^T = g^T J + dL/dz* (Eq. 3), J = df/dz at z*. :func:`implicit_backward`
re-engages f once at z* with autograd on and puts a node in front of it whose backward replaces
the incoming dL/dz* by g, solved with :func:`cdeq.solve` on vector-Jacobian products. Gradients
then flow through that one call of f to every parameter and every tensor f closes over.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from cdeq.solvers import SolverInfo, solve
from cdeq.state import State, StateLayout, as_tuple, map_state


class NonFiniteBackwardError(FloatingPointError, RuntimeError):
    """The implicit backward solve diverged or met a non-finite gradient."""


def vjp_function(fz: State, z: State, layout: StateLayout, create_graph: bool = False) -> Callable[[Tensor], Tensor]:
    """The map v -> v J on flat ``(B, N)`` tensors, J = d fz / d z, by reverse mode on fz's graph
    (kept for repeated use; ``create_graph`` makes the products differentiable).

    Example:
        >>> z = torch.ones(1, 2, requires_grad=True)
        >>> vjp_function(3 * z, z, StateLayout(z))(torch.ones(1, 2))
        tensor([[3., 3.]])
    """
    outputs, inputs = as_tuple(fz), as_tuple(z)

    def vjp(v: Tensor) -> Tensor:
        grads = torch.autograd.grad(outputs, inputs, as_tuple(layout.unflatten(v)), retain_graph=True,
                                    create_graph=create_graph, allow_unused=True)
        return layout.flatten(tuple(torch.zeros_like(x) if d is None else d for x, d in zip(inputs, grads)))

    return vjp


class _ReplaceGradient(torch.autograd.Function):
    """Identity on z* in the forward; in the backward, dL/dz* -> g of Eq. 3, sent into f(z*)."""

    @staticmethod
    def forward(ctx: Any, fz: Tensor, z: Tensor, solve_g: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.solve_g = solve_g
        return z.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None, None]:
        return ctx.solve_g(grad), None, None


def implicit_backward(
    f: Callable[[State], State],
    z_star: State,
    info: SolverInfo,
    *,
    solver: str,
    max_iter: int,
    tol: float,
    stop_mode: str,
    options: Optional[dict] = None,
) -> State:
    """Return a state equal to ``z_star`` whose backward is the implicit gradient (Eq. 2-3).

    When the backward runs, ``info.backward_residual`` ((B,) relative residual of the backward
    solve) and ``info.backward_nfe`` are filled in; a non-finite incoming gradient, or a backward
    solve that diverges (non-finite or exploding residual), raises :class:`NonFiniteBackwardError`.

    Example:
        >>> w = torch.tensor(0.5, requires_grad=True)
        >>> f = lambda z: w * z + 1                      # z* = 1 / (1 - w) = 2
        >>> info = SolverInfo(nfe=0)
        >>> z = implicit_backward(f, torch.full((1, 1), 2.0), info, solver="fixed_point",
        ...                       max_iter=100, tol=1e-7, stop_mode="abs")
        >>> z.sum().backward(); round(w.grad.item(), 3)  # d z*/dw = 1 / (1 - w)^2
        4.0
    """
    layout = StateLayout(z_star, "z_star")
    z_in = map_state(lambda t: t.detach().requires_grad_(), z_star)
    fz = f(z_in)
    layout.check(fz, "f(z*)")
    vjp = vjp_function(fz, z_in, layout)

    def solve_g(grad: Tensor) -> Tensor:
        if not bool(torch.isfinite(grad).all()):
            raise NonFiniteBackwardError("DEQ implicit backward: the incoming gradient dL/dz* is not finite")
        g, b_info = solve(lambda g: vjp(g) + grad, grad, solver=solver, max_iter=max_iter, tol=tol,
                          stop_mode=stop_mode, **(options or {}))
        info.backward_residual = b_info.rel_residual
        info.backward_nfe = b_info.nfe
        bad = b_info.diverged | ~(torch.isfinite(b_info.abs_residual) & torch.isfinite(g).all(dim=1))
        if bool(bad.any()):
            raise NonFiniteBackwardError(
                f"DEQ implicit backward: the solve of g = g J + dL/dz* (Eq. 3, b_solver={solver!r}) diverged "
                f"(non-finite or exploding residual) in sample(s) {torch.nonzero(bad).flatten().tolist()}. "
                "The fixed point is likely unstable (spectral radius of J >= 1): try backward='phantom', "
                "weight/spectral normalisation or Jacobian regularisation"
            )
        return g

    out = _ReplaceGradient.apply(layout.flatten(fz), layout.flatten(z_star), solve_g)
    return layout.unflatten(out)
