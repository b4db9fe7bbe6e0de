"""The DEQ module: solve z* = f(z*) in the forward pass, and differentiate it with the chosen
backward pass (torchdeq paper Sec. 2.3).

- ``backward="implicit"``: implicit differentiation (Eq. 2-3); the returned z is the solver's.
- ``backward="phantom"``: ``phantom_steps`` damped steps (Eq. 5) after the solve, taken with
  autograd on (Eq. 6); the returned z is the state after those steps, in train and eval alike.
  With ``f_max_iter=0, phantom_steps=12, tau=1`` this is BPTT-12.
- ``backward="unroll"``: backpropagation through ``f_max_iter`` damped fixed-point steps
  themselves, with gradient checkpointing when ``checkpoint=True``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from cdeq.backward import implicit_backward, phantom_steps, straight_through, unrolled_solve
from cdeq.config import DEQ_OPTIONS, DEQConfig, check_int, check_options
from cdeq.solvers import SolverInfo, solve
from cdeq.state import State, map_state

Steps = Union[None, str, Sequence[int]]


@dataclass
class DEQInfo(SolverInfo):
    """The forward solve's :class:`cdeq.SolverInfo`, plus what the backward pass reports.

    ``states`` holds the states at the requested ``return_steps`` (differentiable, see
    :meth:`DEQ.forward`). ``backward_residual`` ((B,) relative residual of the solve of Eq. 3) and
    ``backward_nfe`` are filled in when an implicit backward runs.
    """

    backward_residual: Optional[Tensor] = None
    backward_nfe: Optional[int] = None


class DEQ(nn.Module):
    """A deep equilibrium solve with a choice of backward pass: ``z, info = deq(f, z0)``.

    Options are those of :class:`cdeq.DEQConfig` that configure the solve and the backward
    (``f_solver``, ``f_max_iter``, ``f_tol``, ``f_stop_mode``, ``f_options``, ``eval_max_iter``,
    ``backward``, ``b_solver``, ``b_max_iter``, ``b_tol``, ``b_stop_mode``, ``b_options``,
    ``phantom_steps``, ``tau``, ``checkpoint``, ``per_sample``, ``return_steps``); an unknown one is an error
    listing the valid ones. The settings are in ``deq.config``.

    Example:
        >>> lin = torch.nn.Linear(4, 4)
        >>> x = torch.randn(2, 4)
        >>> deq = DEQ(f_solver="fixed_point", f_max_iter=50, backward="implicit")
        >>> z, info = deq(lambda z: torch.tanh(0.5 * lin(z)) + x, torch.zeros(2, 4))
        >>> z.sum().backward()      # gradients reach lin's parameters (and x if it needs them)
    """

    def __init__(self, **options: Any) -> None:
        super().__init__()
        check_options(options, DEQ_OPTIONS, "DEQ")
        self.config = DEQConfig(**options)

    @classmethod
    def from_config(cls, cfg: DEQConfig) -> "DEQ":
        """A DEQ with the solve and backward settings of ``cfg``.

        Example:
            >>> DEQ.from_config(DEQConfig(backward="phantom", phantom_steps=3)).config.phantom_steps
            3
        """
        if not isinstance(cfg, DEQConfig):
            raise TypeError(f"DEQ.from_config: expected a cdeq.DEQConfig, got {type(cfg).__name__}")
        return cls(**{name: getattr(cfg, name) for name in DEQ_OPTIONS})

    def extra_repr(self) -> str:
        cfg = self.config
        return f"backward={cfg.backward!r}, f_solver={self._f_solver()!r}, f_max_iter={cfg.f_max_iter}"

    def _f_solver(self) -> str:
        if self.config.f_solver is not None:
            return self.config.f_solver
        return "fixed_point" if self.config.backward == "unroll" else "anderson"

    def forward(
        self,
        f: Callable[[State], State],
        z0: State,
        *,
        return_steps: Steps = None,
        max_iter: Optional[int] = None,
        trace: bool = False,
    ) -> tuple[State, DEQInfo]:
        """Solve z* = f(z*) from ``z0`` and return ``(z, info)``.

        Args:
            f: the layer with its input injection closed over, state -> state (tensor or tuple).
            z0: the initial state (detached for implicit/phantom; unroll backpropagates into it).
            return_steps: solver steps k (or ``"all"``) whose iterates z_k go to ``info.states``,
                in that order; a step at or past the solve's last one gives the final state, so
                with ``"all"`` or steps ending at ``max_iter`` (as ``--n_states`` gives),
                ``info.states[-1]`` is the returned state ``z`` (TorchDEQ's ``z_out[-1]``; ``z``
                itself is a state, not a list: ``z[-1]`` would be the last sample).
                In training mode the config's ``return_steps`` are the default. Gradients: the
                unrolled iterates' own; for phantom, each state is advanced by the phantom steps
                and differentiated through them (Eq. 6); for implicit, each state keeps the
                solver's value and gets the phantom gradient (Eq. 6, straight-through).
            max_iter: this call's forward budget, e.g. random for path independence (default:
                ``f_max_iter`` in training, ``eval_max_iter`` in eval mode if set).
            trace: record the per-step relative residuals in ``info.trace``.
        """
        cfg = self.config
        if max_iter is None:
            max_iter = cfg.f_max_iter if self.training or cfg.eval_max_iter is None else cfg.eval_max_iter
        check_int("max_iter", max_iter, 0)
        if return_steps is None and self.training:
            return_steps = cfg.return_steps
        _check_steps(return_steps, max_iter)
        if cfg.backward == "unroll":
            z, info = unrolled_solve(f, z0, max_iter=max_iter, tol=cfg.f_tol, stop_mode=cfg.f_stop_mode, tau=cfg.tau,
                                     checkpoint=cfg.checkpoint, return_states=return_steps, trace=trace)
            return z, _deq_info(info)
        z_star, info = self._solve(f, z0, max_iter, return_steps, trace)
        if cfg.backward == "phantom":
            z = phantom_steps(f, z_star, cfg.phantom_steps, cfg.tau)
            if info.states is not None:
                info.states = [phantom_steps(f, s, cfg.phantom_steps, cfg.tau) for s in info.states]
            return z, info
        if not torch.is_grad_enabled():
            return z_star, info
        z = implicit_backward(f, z_star, info, solver=cfg.b_solver, max_iter=cfg.b_max_iter, tol=cfg.b_tol,
                              stop_mode=cfg.b_stop_mode, options={**cfg.b_options, "per_sample": cfg.per_sample})
        if info.states is not None:
            info.states = [straight_through(s, phantom_steps(f, s, cfg.phantom_steps, cfg.tau)) for s in info.states]
        return z, info

    def _solve(self, f: Callable[[State], State], z0: State, max_iter: int, return_steps: Steps,
               trace: bool) -> tuple[State, DEQInfo]:
        """The forward solve without gradients (a zero budget returns ``z0``)."""
        cfg = self.config
        z0 = map_state(torch.Tensor.detach, z0)
        if max_iter == 0:
            with torch.no_grad():
                z, info = unrolled_solve(f, z0, max_iter=0, tol=cfg.f_tol, stop_mode=cfg.f_stop_mode, tau=1.0,
                                         return_states=return_steps, trace=trace)
        else:
            z, info = solve(f, z0, solver=self._f_solver(), max_iter=max_iter, tol=cfg.f_tol,
                            stop_mode=cfg.f_stop_mode, return_states=return_steps, trace=trace,
                            per_sample=cfg.per_sample, **cfg.f_options)
        return z, _deq_info(info)


def _deq_info(info: SolverInfo) -> DEQInfo:
    return DEQInfo(**{f.name: getattr(info, f.name) for f in fields(SolverInfo)})


def _check_steps(steps: Steps, max_iter: int) -> None:
    if steps is None or (isinstance(steps, str) and steps == "all"):
        return
    if isinstance(steps, str) or not isinstance(steps, Sequence):
        raise ValueError(f"return_steps: expected None, 'all' or a list of solver steps, got {steps!r}")
    bad = [k for k in steps if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= max_iter]
    if bad:
        raise ValueError(f"return_steps: steps must be ints in [0, max_iter={max_iter}], got {bad}")
