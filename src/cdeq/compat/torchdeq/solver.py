"""TorchDEQ's solver interface on :func:`cdeq.solve`.

``get_solver(name)(func, x0, max_iter, tol, stop_mode, indexing, **kwargs)`` returns
``(z, states, info)`` as TorchDEQ's solvers do: ``states`` are the iterates at the steps in
``indexing``, ``info`` a :class:`SolverStat` dict. The solve is cdeq's, with TorchDEQ's stopping
rule: the whole batch iterates until every sample meets ``tol`` (``per_sample=False``). TorchDEQ's
options are translated (``tau``, ``m`` with TorchDEQ's default 6, ``lam``, ``LBFGS_thres`` -> ``m``,
``return_final`` -> a fixed budget); one cdeq lacks warns once and is ignored, as TorchDEQ ignores
unknown ones.

Example:
    >>> z, states, info = get_solver("anderson")(lambda z: 0.5 * z + 1, torch.zeros(2, 3), max_iter=30,
    ...                                          tol=1e-8, indexing=[2])
    >>> round(z[0, 0].item(), 6), len(states), sorted(info)[:2]
    (2.0, 1, ['abs_lowest', 'abs_trace'])
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from cdeq.backward import unrolled_solve
from cdeq.compat.torchdeq._args import warn_once
from cdeq.solvers import SolverInfo, available_solvers, solve
from cdeq.state import State

# TorchDEQ's solver names -> cdeq's.
SOLVERS = {"fixed_point_iter": "fixed_point", "simple_fixed_point_iter": "fixed_point", "anderson": "anderson",
           "broyden": "broyden"}
ANDERSON_M = 6  # TorchDEQ's default history size (cdeq's is 5)

__all__ = ["SolverStat", "get_solver", "SOLVERS"]


class SolverStat(dict):
    """TorchDEQ's solver statistics: ``abs_lowest``/``rel_lowest`` (B,) residuals of the returned
    state, ``abs_trace``/``rel_trace`` (B, nfe) residuals of the iterates f was called on, ``nstep``
    (B,) the step at which the sample met tol (the last step otherwise) and ``sradius`` (B,)
    in eval with ``sradius_mode``, else ``tensor([-1.])``/``zeros(1)`` like TorchDEQ's."""

    @classmethod
    def from_info(cls, info: SolverInfo) -> "SolverStat":
        empty = torch.full((1, 1), -1.0)
        return cls(
            abs_lowest=info.abs_residual,
            rel_lowest=info.rel_residual,
            abs_trace=info.abs_trace.t() if info.abs_trace is not None else empty,
            rel_trace=info.trace.t() if info.trace is not None else empty,
            nstep=info.steps.to(torch.get_default_dtype()),
            sradius=torch.tensor([-1.0]),
        )


def cdeq_name(name: str, where: str) -> str:
    """The cdeq solver behind TorchDEQ's ``name`` (cdeq's own names pass through)."""
    if name in SOLVERS:
        return SOLVERS[name]
    if name in available_solvers():
        return name
    raise ValueError(f"{where}: unknown solver {name!r}; TorchDEQ's names: {sorted(SOLVERS)}, "
                     f"cdeq's: {available_solvers()}")


def translate_options(name: str, kwargs: dict) -> tuple[dict, bool]:
    """cdeq's options for TorchDEQ's solver ``name`` given TorchDEQ's ``kwargs``, and whether the
    solve runs its whole budget (``simple_fixed_point_iter``, ``return_final=True``)."""
    solver = SOLVERS.get(name, name)
    options: dict = {"m": ANDERSON_M} if solver == "anderson" else {}
    full_budget = name == "simple_fixed_point_iter"
    for key, value in kwargs.items():
        if key == "tau" and solver in ("fixed_point", "anderson"):
            options["tau"] = value
        elif key == "m" and solver == "anderson":
            options["m"] = value
        elif key == "lam" and solver == "anderson":
            options["lam"] = value
            warn_once("lam", "Anderson's lam is relative to the mean squared residual in cdeq (scale-free), "
                             "TorchDEQ's is absolute; the value is passed as cdeq's relative lam")
        elif key == "LBFGS_thres" and solver == "broyden":
            if value is not None:
                options["m"] = value
        elif key == "return_final":
            full_budget = full_budget or bool(value)
        elif key == "ls" and solver == "broyden":
            if value:
                warn_once("ls", "Broyden line search (ls=True) is not implemented: cdeq's Broyden takes full steps")
        else:
            warn_once(f"solver_kwargs.{key}", f"solver option {key!r} is not one cdeq's {solver!r} takes; "
                                              "it is ignored, as TorchDEQ ignores unknown options")
    return options, full_budget


def run(name: str, f: Callable[[State], State], z0: State, *, max_iter: int, tol: float, stop_mode: str,
        indexing: Optional[Sequence[int]] = None, **kwargs: Any) -> tuple[State, list, SolverInfo]:
    """Solve ``f(z) = z`` from ``z0`` with TorchDEQ's solver ``name`` (and stopping rule) on cdeq's
    solver, without gradients; returns ``(z, states at indexing, cdeq info with traces)``."""
    solver = cdeq_name(name, "solver")
    options, full_budget = translate_options(name, kwargs)
    steps = list(indexing) if indexing else None
    if max_iter == 0:  # TorchDEQ returns z0: an empty solve
        with torch.no_grad():
            z, info = unrolled_solve(f, z0, max_iter=0, tol=tol, stop_mode=stop_mode, tau=1.0, return_states=steps)
        info.trace = info.abs_trace = None
    else:
        z, info = solve(f, z0, solver=solver, max_iter=int(max_iter), tol=0.0 if full_budget else tol,
                        stop_mode=stop_mode, return_states=steps, trace=True, per_sample=False, **options)
    return z, list(info.states or []), info


def get_solver(key: str) -> Callable[..., tuple[State, list, SolverStat]]:
    """TorchDEQ's solver ``key`` ("anderson", "broyden", "fixed_point_iter",
    "simple_fixed_point_iter"), run by cdeq: ``solver(func, x0, max_iter=50, tol=1e-3,
    stop_mode="abs", indexing=None, **kwargs) -> (z, states, info)``."""
    cdeq_name(key, "get_solver")

    def solver(func: Callable[[Tensor], Tensor], x0: Tensor, max_iter: int = 50, tol: float = 1e-3,
               stop_mode: str = "abs", indexing: Optional[Sequence[int]] = None,
               **kwargs: Any) -> tuple[State, list, SolverStat]:
        z, states, info = run(key, func, x0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, indexing=indexing,
                              **kwargs)
        return z, states, SolverStat.from_info(info)

    return solver
