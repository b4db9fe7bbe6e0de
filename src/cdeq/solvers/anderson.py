"""Type-II Anderson acceleration (torchdeq Eq. 8-9; C-DEQ Eq. 4 and 12) with per-sample stopping.

z_{k+1} = sum_i alpha_i (z_i + tau g_i), g_i = f(z_i) - z_i, over the last m iterates, where alpha
minimises ||G alpha||^2 + lam * s * ||alpha||^2 subject to 1^T alpha = 1 (s = mean of diag(G G^T)).
That makes alpha proportional to H^{-1} 1 with H = G G^T + lam * s * I, and bounds
||alpha||^2 <= (m + lam) / lam (compare the objective at alpha = e_newest), so the regulariser is
scale-free. Ring buffers hold g_i and y_i = z_i + tau g_i; each step writes one slot of each, adds
one row/column to the Gram matrix with one bmm, solves the small system batched (float32, float64
for float64 states) and mixes with one more bmm. The step is computed for the whole batch and
:meth:`~cdeq.solvers.base.Monitor.select` keeps a frozen sample's (met tol, or diverged) old
iterate; a diverged sample's NaN stays in its own rows of the buffers. The per-step cost on the CPU
is mostly the fixed cost of each op, so the step issues few: views are made once per solve.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from cdeq.solvers.base import FlatFn, Monitor, ReturnStates, SolverInfo, vector_norm
from cdeq.solvers.fixed_point import check_tau


# |alpha| above this means a (near-)singular or non-finite solve (checked when lam = 0; with lam > 0,
# ||alpha||^2 <= (m + lam) / lam, so only a non-finite H could fail, and the divergence check keeps
# those samples frozen).
ALPHA_LIMIT = 1e6


class _Slot:
    """Views of ring-buffer slot s: where a step writes g and y and the new Gram row and column."""

    def __init__(self, G: Tensor, Y: Tensor, gram: Tensor, s: int) -> None:
        self.g, self.y = G[:, s], Y[:, s]
        self.g_row = self.g.unsqueeze(1)
        self.gram_row, self.gram_col = gram[:, s:s + 1], gram[:, :, s:s + 1].transpose(1, 2)  # (B, 1, m) each
        self.gram_ss = gram[:, s, s]  # ||g_s||^2


class _Span:
    """Views of the first n slots (the window while the buffers fill, then all m) and the solve of
    Eq. 9 for them: alpha minimises alpha^T H alpha subject to 1^T alpha = 1, with
    H = G G^T + lam * (mean(diag) + floor / n) * I, so alpha = H^{-1} 1 / (1^T H^{-1} 1). It is solved
    as the bordered (KKT) system [[H, 1], [1^T, 0]] [alpha; -mu] = [0; 1], which yields the
    normalised alpha as a row directly (two ops fewer than normalising H^{-1} 1)."""

    def __init__(self, Y: Tensor, gram: Tensor, diag_and_floor: Tensor, lam: float, n: int) -> None:
        B, work, dev = gram.shape[0], gram.dtype, gram.device
        self.n, self.lam, self.Y, self.gram = n, lam, Y[:, :n], gram[:, :n, :n]
        self.diag_and_floor = diag_and_floor[:, :, :n + 1]  # the n diagonal entries, then the floor
        self.unit = torch.eye(n, dtype=work, device=dev)  # row s: e_s, the fallback weights when lam = 0
        self.eye = self.unit * (lam / n)
        self.kkt = torch.zeros(B, n + 1, n + 1, dtype=work, device=dev)
        self.kkt[:, n, :n] = 1
        self.kkt[:, :n, n] = 1
        self.H = self.kkt[:, :n, :n]
        self.rhs = torch.zeros(B, 1, n + 1, dtype=work, device=dev)
        self.rhs[:, :, n] = 1

    def weights(self, s: int) -> Tensor:
        """alpha, ``(B, 1, n)``. With lam > 0, H is SPD with finite entries for every healthy sample,
        so alpha is finite; the floor keeps H invertible when every g_i is 0 (an exact fixed point)
        while adding nothing measurable otherwise. With lam = 0 a sample whose alpha is non-finite
        or huge (singular H) takes e_s, a damped fixed-point step. No host sync."""
        if self.lam > 0:
            diag_sum = torch.sum(self.diag_and_floor, dim=2, keepdim=True)  # (mean is 3x the time of sum here)
            torch.addcmul(self.gram, diag_sum, self.eye, out=self.H)
        else:
            self.H.copy_(self.gram)
        alpha = torch.linalg.solve_ex(self.kkt, self.rhs, left=False)[0][:, :, :self.n]  # the row solution
        if self.lam > 0:
            return alpha
        ok = torch.linalg.vector_norm(alpha, float("inf"), dim=2, keepdim=True) <= ALPHA_LIMIT
        return torch.where(ok, alpha, self.unit[s])


class _Window:
    """The ring buffers of one solve, made once: G (g_i) and Y (y_i) of m slots, the Gram matrix
    G G^T with its floor, each slot's and span's views, and the two buffers the iterate alternates
    between; ``history`` pairs fill the first ``pre`` slots."""

    def __init__(self, z0: Tensor, m: int, lam: float, tau: float, history: Sequence[tuple[Tensor, Tensor]]) -> None:
        B, N = z0.shape
        self.work = work = torch.float64 if z0.dtype == torch.float64 else torch.float32
        # added to sum(diag G G^T) when lam > 0: with every g_i = 0, H = lam floor / n I keeps the bordered
        # system nonsingular (alpha = 1 / n), and n / (lam floor), the size of H^-1, stays below the largest float
        floor = max(4.0 * m * m / (lam * torch.finfo(work).max), torch.finfo(work).tiny) if lam > 0 else 0.0
        # G starts at 0 so that the Gram row over all m slots is finite (and unused) for slots not yet written
        G = z0.new_zeros(B, m, N)  # ring buffer of g_i
        Y = z0.new_empty(B, m, N)  # ring buffer of y_i = z_i + tau g_i
        self.GT = G.transpose(1, 2)
        # The Gram matrix G G^T, with one more entry per sample holding the floor. Its diagonal entry i
        # sits at i (m + 1), the floor at m (m + 1): a strided view of n + 1 entries is then the n diagonal
        # entries of a span followed by the floor, which for n < m is the diagonal entry of the unwritten
        # slot n, set to the floor too. Summing that view adds the floor without an op of its own.
        store = torch.zeros(B, m * m + m + 1, dtype=work, device=z0.device)
        gram = store[:, :m * m].view(B, m, m)
        gram.diagonal(dim1=1, dim2=2).fill_(floor)
        store[:, -1] = floor
        diag_and_floor = store.as_strided((B, 1, m + 1), (store.stride(0), 1, m + 1))
        self.slots = [_Slot(G, Y, gram, s) for s in range(m)]
        self.pre = _preload(history, G, Y, gram, tau)
        # the window holds min(k, m) slots: spans[n - 1] for n of them (None for one, which needs no solve)
        self.spans = [None] + [_Span(Y, gram, diag_and_floor, lam, n) for n in range(2, m + 1)]
        self.outs = [z0.new_empty(B, N) for _ in range(2)]
        self.outs_row = [out.unsqueeze(1) for out in self.outs]


def anderson(f: FlatFn, z0: Tensor, *, max_iter: int, tol: float, stop_mode: str, return_states: ReturnStates,
             trace: bool, m: int = 5, tau: float = 1.0, lam: float = 1e-4, per_sample: bool = True,
             history: Sequence[tuple[Tensor, Tensor]] = ()) -> tuple[Tensor, SolverInfo]:
    """Anderson acceleration on flat ``(B, N)`` states; ``m`` history size, ``tau`` damping (beta of
    C-DEQ Eq. 12), ``lam`` regularisation relative to the residuals' squared norms. ``history``:
    pairs (z_i, f(z_i)) known before the solve (or estimates of them, e.g. a C-DEQ student's
    (z, h(z))), oldest first; the last ``m - 1`` fill the window as if they were earlier iterates,
    so the first step already mixes, at no call of ``f``."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m: expected an int >= 1 (history size), got {m!r}")
    check_tau(tau)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam < math.inf:
        raise ValueError(f"lam: expected a finite number >= 0, got {lam!r}")
    mon = Monitor(z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, return_states=return_states, trace=trace,
                  per_sample=per_sample)
    m = min(m, max_iter + len(history))
    win = _Window(z0, m, lam, tau, history[len(history) - min(len(history), m - 1):])
    slots, spans, outs, outs_row, GT, pre = win.slots, win.spans, win.outs, win.outs_row, win.GT, win.pre
    dtype, work = z0.dtype, win.work
    z, k = z0, 0
    while k < max_iter:
        s = (k + pre) % m
        slot = slots[s]
        fz = f(z)
        k += 1
        torch.sub(fz, z, out=slot.g)
        row = torch.bmm(slot.g_row, GT)  # <g_k, g_i>: one new row/column of G G^T
        if row.dtype != work:
            row = row.to(work)
        slot.gram_row.copy_(row)
        slot.gram_col.copy_(row)
        mon.observe(k, slot.gram_ss.sqrt(), vector_norm(fz) if mon.needs_rel else None)
        if tau == 1:
            slot.y.copy_(fz)
        else:
            torch.lerp(z, fz, tau, out=slot.y)
        del fz  # free f's output before the next call, so the allocator hands its block back to f
        span = spans[min(k + pre, m) - 1]
        new = outs[k % 2]
        if span is None:  # one slot in the window: z_k = y (the buffer's copy: the slot is rewritten next)
            new.copy_(slot.y)
        else:
            alpha = span.weights(s)
            torch.bmm(alpha if dtype == work else alpha.to(dtype), span.Y, out=outs_row[k % 2])
        z = mon.select(new, z)
        mon.record(k, z)
        if mon.done():
            break
    return z, mon.finish(z, k)


def _preload(history: Sequence[tuple[Tensor, Tensor]], G: Tensor, Y: Tensor, gram: Tensor, tau: float) -> int:
    """Write the pairs (z_i, f(z_i)) of ``history`` into the first slots of the ring buffers and
    their Gram block; returns how many slots they fill."""
    for i, (z, fz) in enumerate(history):
        torch.sub(fz, z, out=G[:, i])
        torch.lerp(z, fz, tau, out=Y[:, i])
    n = len(history)
    if n:
        gram[:, :n, :n] = torch.bmm(G[:, :n], G[:, :n].transpose(1, 2)).to(gram.dtype)
    return n
