"""Backpropagation through the iterations themselves: damped fixed-point steps (torchdeq paper
Eq. 5; tau = 1 is BPTT) run with autograd on, optionally with gradient checkpointing so that the
activations inside f are recomputed in the backward instead of stored."""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as checkpointed

from cdeq.solvers import SolverInfo
from cdeq.solvers.base import vector_norm
from cdeq.state import State, StateLayout

_TINY = torch.finfo(torch.float32).tiny


def unrolled_solve(
    f: Callable[[State], State],
    z0: State,
    *,
    max_iter: int,
    tol: float,
    stop_mode: str,
    tau: float,
    checkpoint: bool = False,
    return_states: Union[None, str, Sequence[int]] = None,
    trace: bool = False,
) -> tuple[State, SolverInfo]:
    """Take up to ``max_iter`` steps z <- tau f(z) + (1 - tau) z from ``z0`` under the caller's
    grad mode, so that autograd differentiates through every step.

    With ``tol > 0`` the loop ends once every sample's residual (``stop_mode``) meets it; samples
    are not frozen, so the graph is the plain unrolled one. ``return_states`` ("all" or step
    indices) keeps iterates, with their gradients, in ``info.states``; an index past the last
    step gives the final state. The residual fields of ``info`` are those of the returned z, from
    one more call of ``f`` without gradients, as in :func:`cdeq.solve`.

    Example:
        >>> z, info = unrolled_solve(lambda z: 0.5 * z + 1, torch.zeros(1, 2), max_iter=3,
        ...                          tol=0.0, stop_mode="rel", tau=1.0)
        >>> z, info.nfe
        (tensor([[1.7500, 1.7500]]), 3)
    """
    layout = StateLayout(z0, "z0")

    def f_flat(z: Tensor) -> Tensor:
        return layout.flatten(f(layout.unflatten(z)))

    step = (lambda z: checkpointed(f_flat, z, use_reentrant=False)) if checkpoint else f_flat
    z = layout.flatten(z0)
    iterates, rel_trace = [z], []
    steps = torch.full((layout.batch_size,), max_iter, dtype=torch.long, device=z.device)
    for k in range(1, max_iter + 1):
        fz = step(z)
        with torch.no_grad():
            abs_r, rel_r = _residuals(fz, z)
            rel_trace.append(rel_r)
            met = (rel_r if stop_mode == "rel" else abs_r) <= tol
            steps = torch.where(met & (steps == max_iter), torch.full_like(steps, k), steps)
        z = fz if tau == 1.0 else torch.lerp(z, fz, tau)
        iterates.append(z)
        if tol > 0 and bool(met.all()):
            break
    nfe = len(iterates) - 1
    with torch.no_grad():
        abs_r, rel_r = _residuals(f_flat(z), z)
    residual = rel_r if stop_mode == "rel" else abs_r
    states = None if return_states is None else _picked(layout, iterates, return_states)
    info = SolverInfo(nfe=nfe, abs_residual=abs_r, rel_residual=rel_r, converged=residual <= tol,
                      steps=steps.clamp_max(nfe), diverged=~torch.isfinite(abs_r),
                      trace=torch.stack(rel_trace) if trace and rel_trace else None, states=states)
    return layout.unflatten(z), info


def _residuals(fz: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample ||f(z) - z|| and ||f(z) - z|| / ||f(z)||."""
    abs_r = vector_norm(fz - z)
    return abs_r, abs_r / vector_norm(fz).clamp_min(_TINY)


def _picked(layout: StateLayout, iterates: list[Tensor], return_states: Union[str, Sequence[int]]) -> list[State]:
    """The iterates ``return_states`` asks for ("all" or indices; one past the last step gives the last)."""
    nfe = len(iterates) - 1
    picks = range(nfe + 1) if return_states == "all" else return_states
    return [layout.unflatten(iterates[min(k, nfe)]) for k in picks]
