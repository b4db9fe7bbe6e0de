"""Damped fixed-point (Picard) iteration, z_{k+1} = (1 - tau) z_k + tau f(z_k) (torchdeq Eq. 7)."""
from __future__ import annotations

import torch
from torch import Tensor

from cdeq.solvers.base import FlatFn, Monitor, ReturnStates, SolverInfo, vector_norm


def check_tau(tau: float) -> None:
    """Damping must lie in (0, 1] (beta in C-DEQ Eq. 4/12)."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau <= 1:
        raise ValueError(f"tau: expected a damping factor in (0, 1], got {tau!r}")


def fixed_point(f: FlatFn, z0: Tensor, *, max_iter: int, tol: float, stop_mode: str,
                return_states: ReturnStates, trace: bool, tau: float = 1.0,
                per_sample: bool = True) -> tuple[Tensor, SolverInfo]:
    """Fixed-point iteration on flat ``(B, N)`` states; with ``tau=1`` z_k = f^k(z_0) exactly."""
    check_tau(tau)
    mon = Monitor(z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, return_states=return_states, trace=trace,
                  per_sample=per_sample)
    z, k = z0, 0
    while k < max_iter:
        fz = f(z)
        k += 1
        mon.observe(k, vector_norm(fz - z), vector_norm(fz) if mon.needs_rel else None)
        z = mon.select(fz if tau == 1 else torch.lerp(z, fz, tau), z)
        del fz  # free f's output before the next call, so the allocator hands its block back to f
        mon.record(k, z)
        if mon.done():
            break
    return z, mon.finish(z, k)
