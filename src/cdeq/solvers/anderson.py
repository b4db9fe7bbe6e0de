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


# |alpha| above this means a (near-)singular or non-finite solve; with lam > 0, |alpha| <= sqrt(m / lam).
ALPHA_LIMIT = 1e6


def _weights(gram: Tensor, lam: float, ones: Tensor, fallback: Tensor) -> Tensor:
    """alpha = H^{-1} 1 / (1^T H^{-1} 1) per sample, H = gram + lam * mean(diag(gram)) * I; where
    H is singular or alpha non-finite or huge, the sample takes ``fallback`` (e_last: a damped
    fixed-point step). No host sync."""
    H = gram.clone()
    H.diagonal(dim1=1, dim2=2).add_(gram.diagonal(dim1=1, dim2=2).mean(dim=1, keepdim=True), alpha=lam)
    beta = torch.linalg.solve_ex(H, ones)[0].squeeze(2)
    alpha = beta / beta.sum(dim=1, keepdim=True)
    return torch.where(alpha.abs().amax(dim=1, keepdim=True) <= ALPHA_LIMIT, alpha, fallback)


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
    G = z0.new_empty(B, m, N)  # ring buffer of g_i
    Y = z0.new_empty(B, m, N)  # ring buffer of y_i = z_i + tau g_i
    gram = torch.zeros(B, m, m, dtype=work, device=z0.device)
    ones = torch.ones(B, m, 1, dtype=work, device=z0.device)
    eye = torch.eye(m, dtype=work, device=z0.device)
    buffers = (z0.new_empty(B, N), z0.new_empty(B, N))
    z, k = z0, 0
    while k < max_iter:
        s, n = k % m, min(k + 1, m)
        fz = f(z)
        k += 1
        g, y = G[:, s], Y[:, s]
        torch.sub(fz, z, out=g)
        if tau == 1:
            y.copy_(fz)
        else:
            torch.lerp(z, fz, tau, out=y)
        row = torch.bmm(g.unsqueeze(1), G[:, :n].transpose(1, 2)).squeeze(1).to(work)
        gram[:, s, :n] = row
        gram[:, :n, s] = row
        advance = mon.observe(k, row[:, s].sqrt(), vector_norm(fz) if mon.needs_rel else None)
        out = buffers[k % 2]
        if n == 1:
            out.copy_(y)
        else:
            alpha = _weights(gram[:, :n, :n], lam, ones[:, :n], eye[s, :n]).to(z0.dtype)
            torch.bmm(alpha.unsqueeze(1), Y[:, :n], out=out.unsqueeze(1))
        z = torch.where(advance, out, z, out=out)
        mon.record(k, z)
        if mon.done():
            break
    return z, mon.finish(z, k)
