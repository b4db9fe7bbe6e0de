"""TorchDEQ's DEQ module (``get_deq``, cores "sliced" and "indexing") on cdeq's solvers and backward
passes (torchdeq paper Sec. 2.3).

``deq = get_deq(args, **kwargs)`` reads TorchDEQ's settings with TorchDEQ's defaults (solver
"fixed_point_iter", 40 steps, tol 1e-3 "abs", backward solver "fixed_point_iter", 40 steps, tol
1e-6 "abs", one phantom step, core "sliced"); ``z_out, info = deq(func, z_init)`` returns a *list*
of states and a dict (:class:`~cdeq.compat.torchdeq.solver.SolverStat`). In training the list
holds the states that carry gradients: one per ``n_states``/``indexing`` entry (each advanced by
its ``grad`` phantom steps, Eq. 5-6; the last by the implicit backward, Eq. 2-3, with ``ift``), and
more with ``sup_gap``/``sup_loc``; in eval, ``[z*]``. Use ``z_out[-1]``. A tuple state is passed to
``func`` unpacked, ``func(*z)``, and comes back as a list, as in TorchDEQ.

The solves are :func:`cdeq.solve` with whole-batch stopping (TorchDEQ's rule), the phantom steps
:func:`cdeq.backward.phantom_steps`, the implicit backward :func:`cdeq.backward.implicit_backward`.
Differences: the returned state is the solver's last iterate (TorchDEQ: the lowest-residual one,
the same once converged); with ``ift`` its value is z* (TorchDEQ: f(z*), one more step); indexed
states past an early stop are the final state (TorchDEQ drops them).

Example:
    >>> deq = get_deq(f_max_iter=60, f_tol=1e-9, ift=True)
    >>> x = torch.randn(2, 3)
    >>> z_out, info = deq(lambda z: torch.tanh(0.5 * z + x), torch.zeros(2, 3))
    >>> len(z_out), bool(info["abs_lowest"].max() < 1e-8)
    (1, True)
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from cdeq.backward import implicit_backward, phantom_steps
from cdeq.compat.torchdeq import solver as _solver
from cdeq.compat.torchdeq._args import Settings, warn_once
from cdeq.config import DEQConfig
from cdeq.deq import DEQInfo
from cdeq.dropout import reset_dropout
from cdeq.norm import reset_norm
from cdeq.regularize import spectral_radius
from cdeq.state import State, map_state

__all__ = ["get_deq", "reset_deq", "register_deq", "DEQIndexing", "DEQSliced"]

IFT = "ift"
SRADIUS_ITERS = 100  # TorchDEQ's power-method steps for sradius_mode


def _pair(steps: Sequence[int], grad: Sequence[int]) -> list:
    """One phantom-gradient setting per sampled state: ``grad`` as it is, or its one value repeated."""
    if len(grad) == len(steps):
        return list(grad)
    if len(grad) == 1:
        return [grad[0]] * len(steps)
    raise ValueError(f"grad: expected 1 value or one per sampled state ({len(steps)}: {list(steps)}), got {list(grad)}")


class _WriterInfo(DEQInfo):
    """The backward report of :func:`implicit_backward`, handed to TorchDEQ's ``backward_writer``."""

    def __init__(self, writer: Optional[Callable[[dict], Any]]) -> None:
        super().__init__(nfe=0)
        self.writer = writer

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "backward_nfe" and value is not None and getattr(self, "writer", None) is not None:
            self.writer(_solver.SolverStat(rel_lowest=self.backward_residual, nstep=torch.tensor([float(value)])))


class _TorchDEQ(nn.Module):
    """A DEQ with TorchDEQ's settings and return values; see the module docstring."""

    core = "sliced"

    def __init__(self, args: Any = None, **kwargs: Any) -> None:
        super().__init__()
        s = Settings(args, kwargs)
        self.f_solver, self.b_solver = s.get("f_solver", "fixed_point_iter"), s.get("b_solver", "fixed_point_iter")
        self.f_max_iter, self.b_max_iter = s.get("f_max_iter", 40), s.get("b_max_iter", 40)
        self.f_tol, self.b_tol = s.get("f_tol", 1e-3), s.get("b_tol", 1e-6)
        self.f_stop_mode, self.b_stop_mode = s.get("f_stop_mode", "abs"), s.get("b_stop_mode", "abs")
        eval_f_max_iter, eval_factor = s.get("eval_f_max_iter", 0), s.get("eval_factor", 1.0)
        self.eval_f_max_iter = eval_f_max_iter if eval_f_max_iter > 0 else int(self.f_max_iter * eval_factor)
        grad = s.get("grad", 1)
        self.grad = [grad] if isinstance(grad, int) else list(grad)
        self.tau, self.sup_gap, self.sup_loc = s.get("tau", 1.0), s.get("sup_gap", -1), list(s.get("sup_loc") or [])
        self.n_states, self.indexing = s.get("n_states", 1), list(s.get("indexing") or [])
        self.ift = bool(s.get("ift", False) or s.get("hook_ift", False))
        if s.get("hook_ift", False):
            warn_once("hook_ift", "hook_ift runs cdeq's one implicit backward (an autograd.Function, like "
                                  "TorchDEQ's default ift), not a backward hook")
        # cdeq's own checks name any bad value
        DEQConfig(f_solver=_solver.cdeq_name(self.f_solver, "f_solver"),
                  b_solver=_solver.cdeq_name(self.b_solver, "b_solver"),
                  f_max_iter=self.f_max_iter, b_max_iter=self.b_max_iter, f_tol=self.f_tol, b_tol=self.b_tol,
                  f_stop_mode=self.f_stop_mode, b_stop_mode=self.b_stop_mode, eval_max_iter=self.eval_f_max_iter,
                  tau=self.tau, return_steps=self.indexing)
        if not self.grad or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in self.grad):
            raise ValueError(f"grad: expected phantom-gradient steps, ints >= 1, got {self.grad}")
        self.steps = self.sample_steps(self.f_max_iter)
        _pair(self.steps, self.grad)

    def extra_repr(self) -> str:
        return f"core={self.core!r}, f_solver={self.f_solver!r}, f_max_iter={self.f_max_iter}, ift={self.ift}"

    def sample_steps(self, f_max_iter: int) -> list[int]:
        """The solver steps of the states sampled in training (indexing core: absolute steps)."""
        if self.n_states > 1:
            n = max(min(f_max_iter, self.n_states), 1)
            delta = f_max_iter // n
            return [f_max_iter - (n - 1 - k) * delta for k in range(n)]
        return [*self.indexing, f_max_iter]

    def _grads(self, steps: Sequence[int]) -> list:
        kinds = _pair(steps, self.grad)
        if self.ift:
            kinds[-1] = IFT
        return kinds

    def _solve(self, f: Callable, z0: State, max_iter: int, steps: Optional[list], options: dict) -> tuple:
        z0 = map_state(torch.Tensor.detach, z0)
        return _solver.run(self.f_solver, f, z0, max_iter=max_iter, tol=self.f_tol, stop_mode=self.f_stop_mode,
                           indexing=steps, **options)

    def _grad(self, f: Callable, z: State, kind: Any, writer: Optional[Callable]) -> list:
        """The differentiable states built from the solver state ``z`` (detached first)."""
        z = map_state(torch.Tensor.detach, z)
        if kind == IFT:
            options = {"per_sample": False, **_solver.translate_options(self.b_solver, {})[0]}
            return [implicit_backward(f, z, _WriterInfo(writer), solver=_solver.cdeq_name(self.b_solver, "b_solver"),
                                      max_iter=self.b_max_iter, tol=self.b_tol, stop_mode=self.b_stop_mode,
                                      options=options)]
        if self.sup_gap <= 0 and not self.sup_loc:
            return [phantom_steps(f, z, kind, self.tau)]
        outs = []
        for i in range(1, kind + 1):
            z = phantom_steps(f, z, 1, self.tau)
            if (self.sup_gap > 0 and i % self.sup_gap == 0) or (self.sup_gap <= 0 and i in self.sup_loc):
                outs.append(z)
        return outs if self.sup_gap > 0 else outs + [z]

    def _train(self, f: Callable, z0: State, budget: Optional[int], options: dict, writer: Optional[Callable]):
        steps = self.steps if budget is None else self.sample_steps(budget)
        _, states, info = self._solve(f, z0, steps[-1], steps, options)
        outs = [out for state, kind in zip(states, self._grads(steps)) for out in self._grad(f, state, kind, writer)]
        return outs, info

    def forward(self, func: Callable, z_init: State, solver_kwargs: Optional[dict] = None, sradius_mode: bool = False,
                backward_writer: Optional[Callable[[dict], Any]] = None, **kwargs: Any) -> tuple[list, dict]:
        """``(z_out, info)``: the list of states (see the module docstring) and TorchDEQ's info dict.
        ``solver_kwargs`` are this call's solver options, ``f_max_iter`` among them its budget."""
        tuple_state = isinstance(z_init, (list, tuple))
        f = (lambda z: tuple(func(*z))) if tuple_state else func
        z_init = tuple(z_init) if tuple_state else z_init
        options = dict(solver_kwargs or {})
        budget = options.pop("f_max_iter", None)
        budget = int(budget) if isinstance(budget, (int, float)) else None
        if self.training:
            outs, info = self._train(f, z_init, budget, options, backward_writer)
            stat = _solver.SolverStat.from_info(info)
        else:
            z, _, info = self._solve(f, z_init, self.eval_f_max_iter if budget is None else budget, None, options)
            outs, stat = [z], _solver.SolverStat.from_info(info)
            stat["sradius"] = spectral_radius(f, z, SRADIUS_ITERS) if sradius_mode else torch.zeros(1)
        return [list(z) if tuple_state else z for z in outs], stat


class DEQIndexing(_TorchDEQ):
    """TorchDEQ's "indexing" core: one solve, whose states at the sampled steps get the gradients."""

    core = "indexing"


class DEQSliced(_TorchDEQ):
    """TorchDEQ's "sliced" core (the default): the solve is cut into slices at the sampled steps;
    each slice's state gets its gradient steps and the next slice starts from their output."""

    def sample_steps(self, f_max_iter: int) -> list[int]:
        """The number of solver steps of each slice."""
        if self.n_states > 1:
            return [f_max_iter // self.n_states] * self.n_states
        bounds = [0, *self.indexing, f_max_iter]
        return [b - a for a, b in zip(bounds, bounds[1:])]

    def _train(self, f: Callable, z0: State, budget: Optional[int], options: dict, writer: Optional[Callable]):
        steps = self.steps if budget is None else self.sample_steps(budget)
        z, outs, info = z0, [], None
        for n, kind in zip(steps, self._grads(steps)):
            z, _, info = self._solve(f, z, n, None, options)
            outs += self._grad(f, z, kind, writer)
            z = outs[-1]
        return outs, info


_CORES: dict[str, type] = {"indexing": DEQIndexing, "sliced": DEQSliced}


def register_deq(deq_type: str, core: type) -> None:
    """Make ``get_deq(core=deq_type)`` build ``core(args)``."""
    if not isinstance(deq_type, str) or not callable(core):
        raise TypeError(f"register_deq: expected a name and a class, got {deq_type!r}, {core!r}")
    _CORES[deq_type] = core


def get_deq(args: Any = None, **kwargs: Any) -> nn.Module:
    """A DEQ module from TorchDEQ's settings: ``args`` (argparse.Namespace from
    :func:`cdeq.compat.torchdeq.utils.add_deq_args`, dict or None) updated by ``kwargs``; the core
    is ``core`` ("sliced" by default, or "indexing")."""
    settings = Settings(args, kwargs)
    core = settings.get("core", "sliced")
    if core not in _CORES:
        raise ValueError(f"core: expected one of {sorted(_CORES)} (register_deq adds more), got {core!r}")
    return _CORES[core](settings)


def reset_deq(model: nn.Module) -> None:
    """Recompute the normalised weights and forget the variational dropout masks of ``model``
    (once per training step)."""
    reset_norm(model)
    reset_dropout(model)
