"""Type-II Anderson acceleration (torchdeq Eq. 8-9; C-DEQ Eq. 4 and 12) with per-sample stopping.

z_{k+1} = sum_i alpha_i (z_i + tau g_i), g_i = f(z_i) - z_i, over the last m iterates, where alpha
minimises ||G alpha||^2 + lam * s * ||alpha||^2 subject to 1^T alpha = 1 (s = mean of diag(G G^T)).
That makes alpha proportional to H^{-1} 1 with H = G G^T + lam * s * I, and bounds
||alpha||^2 <= m / lam, so the regulariser is scale-free. Ring buffers hold g_i and y_i = z_i + tau g_i;
each step writes one slot of each, adds one row/column to the Gram matrix with one bmm, solves the
small system batched (float32, float64 for float64 states) and mixes with one more bmm.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from cdeq.solvers.base import FlatFn, Monitor, ReturnStates, SolverInfo, vector_norm
from cdeq.solvers.fixed_point import check_tau


def _weights(gram: Tensor, last: int, lam: float) -> Tensor:
    """alpha = H^{-1} 1 / (1^T H^{-1} 1) per sample; where H is singular or alpha non-finite the
    sample falls back to alpha = e_last, a damped fixed-point step. No host sync."""
    B, n, _ = gram.shape
    H = gram.clone()
    scale = lam * gram.diagonal(dim1=1, dim2=2).mean(dim=1, keepdim=True)
    H.diagonal(dim1=1, dim2=2).add_(scale)
    beta, err = torch.linalg.solve_ex(H, torch.ones(B, n, 1, dtype=gram.dtype, device=gram.device))
    alpha = beta.squeeze(2) / beta.sum(dim=1)
    ok = (err == 0) & torch.isfinite(alpha).all(dim=1)
    fallback = torch.zeros_like(alpha)
    fallback[:, last] = 1
    return torch.where(ok.unsqueeze(1), alpha, fallback)


def anderson(f: FlatFn, z0: Tensor, *, max_iter: int, tol: float, stop_mode: str, return_states: ReturnStates,
             trace: bool, m: int = 5, tau: float = 1.0, lam: float = 1e-4) -> tuple[Tensor, SolverInfo]:
    """Anderson acceleration on flat ``(B, N)`` states; ``m`` history size, ``tau`` damping (beta of
    C-DEQ Eq. 12), ``lam`` regularisation relative to the residuals' squared norms."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m: expected an int >= 1 (history size), got {m!r}")
    check_tau(tau)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam < math.inf:
        raise ValueError(f"lam: expected a finite number >= 0, got {lam!r}")
    mon = Monitor(z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, return_states=return_states, trace=trace)
    B, N = z0.shape
    m = min(m, max_iter)
    work = torch.float64 if z0.dtype == torch.float64 else torch.float32
    G = z0.new_empty(B, m, N)
    Y = z0.new_empty(B, m, N)
    gram = torch.zeros(B, m, m, dtype=work, device=z0.device)
    buffers = (z0.new_empty(B, N), z0.new_empty(B, N))
    z, k = z0, 0
    while k < max_iter:
        s, n = k % m, min(k + 1, m)
        fz = f(z)
        k += 1
        g, y = G[:, s], Y[:, s]
        torch.sub(fz, z, out=g)
        torch.lerp(z, fz, tau, out=y)
        row = torch.bmm(G[:, :n], g.unsqueeze(2)).squeeze(2).to(work)
        gram[:, s, :n] = row
        gram[:, :n, s] = row
        advance = mon.observe(k, row[:, s].sqrt(), vector_norm(fz) if mon.needs_rel else None)
        out = buffers[k % 2]
        if n == 1:
            out.copy_(y)
        else:
            alpha = _weights(gram[:, :n, :n], s, lam).to(z0.dtype)
            torch.bmm(alpha.unsqueeze(1), Y[:, :n], out=out.unsqueeze(1))
        z = torch.where(advance, out, z, out=out)
        mon.record(k, z)
        if mon.done():
            break
    return z, mon.finish(z, k)
