"""Type-II Anderson acceleration (torchdeq Eq. 8-9; C-DEQ Eq. 4 and 12) with per-sample stopping.

z_{k+1} = sum_i alpha_i (z_i + tau g_i), g_i = f(z_i) - z_i, over the last m iterates, where alpha
minimises ||G alpha||^2 + lam * s * ||alpha||^2 subject to 1^T alpha = 1 (s = mean of diag(G G^T)).
That makes alpha proportional to H^{-1} 1 with H = G G^T + lam * s * I, and bounds
||alpha||^2 <= (m + lam) / lam (compare the objective at alpha = e_newest), so the regulariser is
scale-free. Ring buffers hold g_i and y_i = z_i + tau g_i;
each step writes one slot of each, adds one row/column to the Gram matrix with one bmm, solves the
small system batched (float32, float64 for float64 states) and mixes with one more bmm. A frozen
sample (met tol, or diverged) gets y = z (damping weight 0, f(z) with non-finite entries zeroed)
and alpha = e_slot, so the mix itself returns its old iterate: no masked select over the state (a
broadcast ``where`` costs several times a ``lerp`` on CPU).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from cdeq.solvers.base import FlatFn, Monitor, ReturnStates, SolverInfo, vector_norm
from cdeq.solvers.fixed_point import check_tau


# |alpha| above this means a (near-)singular or non-finite solve (checked when lam = 0; with lam > 0,
# ||alpha||^2 <= (m + lam) / lam, so only a non-finite H could fail, and the divergence check keeps
# those samples frozen).
ALPHA_LIMIT = 1e6


class _Window:
    """Views of the history for one (slot s, window n) pair, made once so a step issues few ops."""

    def __init__(self, G: Tensor, Y: Tensor, gram: Tensor, ones: Tensor, eye: Tensor, s: int, n: int):
        self.s, self.n = s, n
        self.g, self.y = G[:, s], Y[:, s]
        self.g_row = self.g.unsqueeze(1)
        self.GT, self.Y = G[:, :n].transpose(1, 2), Y[:, :n]
        self.gram_row, self.gram_col = gram[:, s, :n], gram[:, :n, s]
        self.gram, self.gram_diag = gram[:, :n, :n], gram[:, :n, :n].diagonal(dim1=1, dim2=2)
        self.ones, self.eye, self.fallback = ones[:, :n], eye[:n, :n], eye[s, :n]

    def weights(self, lam: float, floor: float, advance: Tensor) -> Tensor:
        """alpha = H^{-1} 1 / (1^T H^{-1} 1), H = G G^T + lam * (mean(diag) + floor / n) * I (Eq. 9).

        With lam > 0, H is SPD with finite entries for every advancing sample (its g_i all passed
        the divergence check), so alpha is finite; ``floor`` keeps H invertible when every g_i is 0
        (an exact fixed point) while adding nothing measurable otherwise. With lam = 0 a sample whose
        alpha is non-finite or huge (singular H) takes e_s, a damped fixed-point step. A frozen
        sample (``advance`` False) takes e_s too; its y_s is its old iterate. No host sync."""
        diag_sum = torch.sum(self.gram_diag, dim=1, keepdim=True)  # (mean is 3x the time of sum here)
        if lam > 0:
            diag_sum.add_(floor)
        H = torch.addcmul(self.gram, diag_sum.unsqueeze(2), self.eye, value=lam / self.n)
        beta = torch.linalg.solve_ex(H, self.ones)[0].squeeze(2)
        alpha = beta / beta.sum(dim=1, keepdim=True)
        if lam > 0:
            return torch.where(advance, alpha, self.fallback)
        ok = torch.linalg.vector_norm(alpha, float("inf"), dim=1, keepdim=True) <= ALPHA_LIMIT
        return torch.where(ok & advance, alpha, self.fallback)


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
    dtype, m = z0.dtype, min(m, max_iter)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    # added to sum(diag G G^T) when lam > 0: with every g_i = 0, H = lam floor / n I and 1^T H^-1 1 =
    # n^2 / (lam floor) stays below the largest float
    floor = max(4.0 * m * m / (lam * torch.finfo(work).max), torch.finfo(work).tiny) if lam > 0 else 0.0
    G = z0.new_empty(B, m, N)  # ring buffer of g_i
    Y = z0.new_empty(B, m, N)  # ring buffer of y_i = z_i + tau g_i
    gram = torch.zeros(B, m, m, dtype=work, device=z0.device)
    ones = torch.ones(B, m, 1, dtype=work, device=z0.device)
    eye = torch.eye(m, dtype=work, device=z0.device)
    # step k uses slot (k-1) % m and window min(k, m): m warm-up windows, then m full ones
    windows = [_Window(G, Y, gram, ones, eye, s, s + 1) for s in range(m)]
    windows += [_Window(G, Y, gram, ones, eye, s, m) for s in range(m)]
    buffers = (z0.new_empty(B, N), z0.new_empty(B, N))
    outs = (buffers[0].unsqueeze(1), buffers[1].unsqueeze(1))
    z, k = z0, 0
    while k < max_iter:
        w = windows[k] if k < m else windows[m + k % m]
        fz = f(z)
        k += 1
        torch.sub(fz, z, out=w.g)
        row = torch.bmm(w.g_row, w.GT).squeeze(1)  # <g_k, g_i>: one new row/column of G G^T
        if row.dtype != work:
            row = row.to(work)
        w.gram_row.copy_(row)
        w.gram_col.copy_(row)
        advance = mon.observe(k, row[:, w.s].sqrt(), vector_norm(fz) if mon.needs_rel else None)
        # y = z + tau g, or exactly z for a frozen sample (a non-finite f(z) zeroed so 0 * it stays 0)
        torch.nan_to_num(fz, nan=0.0, posinf=0.0, neginf=0.0, out=w.y)
        weight = advance.to(dtype) if tau == 1 else advance.to(dtype).mul_(tau)
        torch.lerp(z, w.y, weight, out=w.y)
        del fz  # free f's output before the next call, so the allocator hands its block back to f
        out = buffers[k % 2]
        if w.n == 1:
            out.copy_(w.y)
        else:
            alpha = w.weights(lam, floor, advance)
            torch.bmm((alpha if dtype == work else alpha.to(dtype)).unsqueeze(1), w.Y, out=outs[k % 2])
        z = out
        mon.record(k, z)
        if mon.done():
            break
    return z, mon.finish(z, k)
