"""Limited-memory ("good") Broyden's method for g(z) = f(z) - z = 0 (torchdeq Eq. 10-12).

The inverse Jacobian of g is approximated by B = -I + U V^T with at most ``m`` rank-one terms held
in ring buffers (no N x N matrix); a new pair from the last step dz and residual change dg is the
Sherman-Morrison update of Eq. 11: u = (dz - B dg) / (dz^T B dg), v = B^T dz. The step is
z <- z - B g (Eq. 10/12 with alpha = 1). When the ``m`` slots are full the memory restarts from
B = -I: overwriting the oldest pair instead breaks the secant conditions and made the iteration
diverge on ill-conditioned linear maps. Half-precision states are iterated in float32.
"""
from __future__ import annotations

import torch
from torch import Tensor

from cdeq.solvers.base import FlatFn, Monitor, ReturnStates, SolverInfo, vector_norm


def _low_rank(A: Tensor, C: Tensor, x: Tensor) -> Tensor:
    """sum_i a_i (c_i . x) for the rows a_i of A and c_i of C, each ``(B, j, N)``; x ``(B, N)``."""
    coef = torch.bmm(x.unsqueeze(1), C.transpose(1, 2))  # (B, 1, j); far faster on CPU than C @ x
    return torch.bmm(coef, A).squeeze(1)


def broyden(f: FlatFn, z0: Tensor, *, max_iter: int, tol: float, stop_mode: str, return_states: ReturnStates,
            trace: bool, m: int = 8, per_sample: bool = True) -> tuple[Tensor, SolverInfo]:
    """Broyden's method on flat ``(B, N)`` states keeping the last ``m`` rank-one updates."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m: expected an int >= 1 (number of low-rank updates kept), got {m!r}")
    dtype = z0.dtype
    work = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    mon = Monitor(z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, return_states=return_states, trace=trace,
                  per_sample=per_sample)
    B, N = z0.shape
    U = z0.new_zeros(B, m, N, dtype=work)
    V = z0.new_zeros(B, m, N, dtype=work)
    tiny = torch.finfo(work).tiny
    z, g_prev, dz, j, k = z0.to(work), None, None, 0, 0
    while k < max_iter:
        fz = f(z.to(dtype)).to(work)
        k += 1
        g = fz - z
        mon.observe(k, vector_norm(g), vector_norm(fz) if mon.needs_rel else None)
        del fz  # free f's output before the next call, so the allocator hands its block back to f
        if g_prev is not None:
            if j == m:
                j = 0
            s = j
            dg = g - g_prev
            Bdg = _low_rank(U[:, :j], V[:, :j], dg) - dg
            den = (dz * Bdg).sum(dim=1, keepdim=True)
            ok = torch.isfinite(den) & (den.abs() > tiny)
            U[:, s] = torch.where(ok, (dz - Bdg) / torch.where(ok, den, 1), 0)
            V[:, s] = torch.where(ok, _low_rank(V[:, :j], U[:, :j], dz) - dz, 0)
            j += 1
        z_new = mon.select(z + g - _low_rank(U[:, :j], V[:, :j], g), z)
        dz, g_prev, z = z_new - z, g, z_new
        mon.record(k, z.to(dtype))
        if mon.done():
            break
    z = z.to(dtype)
    return z, mon.finish(z, k)
