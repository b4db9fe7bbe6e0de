"""The ``solve`` front-end, the solver registry, and the per-sample bookkeeping every solver shares.

A solver is a function on flat ``(B, N)`` tensors (see :func:`register_solver`); :func:`solve`
validates the arguments, flattens the (tuple) state with :class:`~cdeq.state.StateLayout`, runs the
solver under ``torch.no_grad()`` and measures the residual of the state it returns with one extra
*check* call of ``f``, which is not counted in ``info.nfe``.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from cdeq.config import SOLVER_ALIASES
from cdeq.precision import caller_autocast, solver_ops
from cdeq.state import State, StateLayout, as_tuple, batch_norm2

FlatFn = Callable[[Tensor], Tensor]
ReturnStates = Union[None, str, Sequence[int]]

STANDARD_ARGS = ("max_iter", "tol", "stop_mode", "return_states", "trace")
# Passed to a solver only when it takes it (the built-in ones do); per_sample=False needs it.
PER_SAMPLE = "per_sample"
# Known pairs (z_i, f(z_i)) a solver may start from (Anderson does); solve flattens them like z0.
HISTORY = "history"
STOP_MODES = ("rel", "abs")
# A sample whose residual grows this many times above its initial residual is marked diverged.
DIVERGENCE_RATIO = 1e4


@dataclass
class SolverInfo:
    """What a solve did, per sample where a field has shape ``(B,)``.

    ``abs_residual``/``rel_residual`` are ||f(z)-z|| and ||f(z)-z||/||f(z)|| of the *returned* z,
    from one check call of ``f`` that ``nfe`` does not count. ``converged``: the returned z meets
    ``tol`` (in ``stop_mode``) and did not diverge. ``steps``: the NFE at which the sample met
    ``tol`` during the solve (``nfe`` if it never did); it is then frozen at the iterate that met
    tol, z_{steps-1}, so its returned residual is the one that met tol. ``diverged``: the sample's
    iterate or residual became non-finite, or its residual grew ``DIVERGENCE_RATIO`` times above
    its initial one; it is frozen at its last finite iterate. ``trace``: ``(nfe, B)`` relative
    residuals of the iterates z_0..z_{nfe-1} that ``f`` was evaluated on. ``states``: the
    iterates asked for with ``return_states``.
    """

    nfe: int
    abs_residual: Optional[Tensor] = None
    rel_residual: Optional[Tensor] = None
    converged: Optional[Tensor] = None
    steps: Optional[Tensor] = None
    diverged: Optional[Tensor] = None
    trace: Optional[Tensor] = None
    states: Optional[list] = None
    abs_trace: Optional[Tensor] = None
    met_tol: Optional[Tensor] = None


_REGISTRY: dict[str, Callable[..., tuple[Tensor, SolverInfo]]] = {}
_OPTIONS: dict[str, Optional[list[str]]] = {}  # each solver's option names, read once at registration
_PER_SAMPLE: dict[str, bool] = {}  # whether the solver takes per_sample


def _option_names(fn: Callable) -> Optional[list[str]]:
    """The solver-specific keyword options ``fn`` accepts, or None if it takes ``**options``."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in STANDARD_ARGS + (PER_SAMPLE,)]


def register_solver(name: str, fn: Callable[..., tuple[Tensor, SolverInfo]], *, overwrite: bool = False) -> None:
    """Make ``fn`` available as ``solve(..., solver=name)``.

    ``fn(f_flat, z0_flat, *, max_iter, tol, stop_mode, return_states, trace, **options)`` works on
    flat ``(B, N)`` tensors and returns ``(z_flat, SolverInfo)``; ``return_states`` reaches it as
    None, ``"all"`` or a tuple of ints. Its keyword-only parameters beyond those are its options;
    ``solve`` rejects any other option unless ``fn`` takes ``**options``. A solver that takes
    ``per_sample`` (bool) gets it, and must then stop on the whole batch when it is False.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_solver: name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise TypeError(f"register_solver: fn must be callable, got {type(fn).__name__}")
    params = inspect.signature(fn).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    missing = [a for a in STANDARD_ARGS if a not in params and not takes_kwargs]
    if missing:
        raise TypeError(f"register_solver: fn {name!r} must accept the keyword arguments {missing}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"register_solver: a solver named {name!r} exists; pass overwrite=True to replace it")
    _REGISTRY[name] = fn
    _OPTIONS[name] = _option_names(fn)
    _PER_SAMPLE[name] = takes_kwargs or PER_SAMPLE in params


def available_solvers() -> list[str]:
    """Names accepted by ``solve(..., solver=...)``."""
    return sorted(_REGISTRY)


def _check_arguments(solver: str, max_iter: int, tol: float, stop_mode: str, return_states: ReturnStates,
                     trace: bool, per_sample: bool, options: dict) -> tuple[Callable, ReturnStates]:
    if solver not in _REGISTRY:
        raise ValueError(f"solver: unknown solver {solver!r}; valid solvers: {available_solvers()} "
                         f"(TorchDEQ's names are accepted too: {sorted(SOLVER_ALIASES)})")
    fn, valid = _REGISTRY[solver], _OPTIONS[solver]
    if not isinstance(per_sample, bool):
        raise ValueError(f"per_sample: expected True or False, got {per_sample!r}")
    if not per_sample and not _PER_SAMPLE[solver]:
        raise ValueError(f"per_sample=False: solver {solver!r} does not take per_sample, so it cannot stop "
                         "on the whole batch")
    unknown = sorted(set(options) - set(valid)) if valid is not None else []
    if unknown:
        raise ValueError(f"solver {solver!r}: unknown option(s) {unknown}; valid options: {valid}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter: expected an int >= 1 (the number of calls of f), got {max_iter!r}; "
                         "for a budget of 0 (z0 returned as it is) use cdeq.DEQ(f_max_iter=0)")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (0 <= tol < math.inf):
        raise ValueError(f"tol: expected a finite number >= 0 (0 = fixed budget), got {tol!r}")
    if stop_mode not in STOP_MODES:
        raise ValueError(f"stop_mode: expected one of {STOP_MODES}, got {stop_mode!r}")
    if not isinstance(trace, bool):
        raise ValueError(f"trace: expected a bool, got {trace!r}")
    if return_states is None or (isinstance(return_states, str) and return_states == "all"):
        return fn, return_states
    if isinstance(return_states, str) or not isinstance(return_states, Sequence):
        raise ValueError(f"return_states: expected None, 'all' or a list of ints, got {return_states!r}")
    bad = [i for i in return_states if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= max_iter]
    if bad:
        raise ValueError(f"return_states: iterate indices must be ints in [0, max_iter={max_iter}], got {bad}")
    return fn, tuple(return_states)


class _CountedF:
    """``f`` on flat states: counts calls, checks the first output against ``z0``'s layout, and
    runs under the solve's caller's autocast setting (``autocast``), its output in z's dtype.

    Without autocast no context is entered, and an output already in z's dtype is not passed
    through ``.to``: each is a dispatcher call that cost 1-4 us per step warm and 15-40 us right
    after a real f, when the code paths are cold (docs/solver-speed.md)."""

    def __init__(self, f: Callable[[State], State], layout: StateLayout,
                 autocast: Callable[[], contextlib.AbstractContextManager]) -> None:
        self.f, self.layout, self.calls = f, layout, 0
        self.autocast = None if autocast is contextlib.nullcontext else autocast

    def __call__(self, z: Tensor) -> Tensor:
        if self.autocast is None:
            out = self.f(self.layout.unflatten(z))
        else:
            with self.autocast():
                out = self.f(self.layout.unflatten(z))
        if self.calls == 0:
            self.layout.check(out, "f(z)")
        self.calls += 1
        flat = self.layout.flatten(out)
        return flat if flat.dtype == z.dtype else flat.to(z.dtype)

def solve(f: Callable[[State], State], z0: State, *, solver: str = "anderson", max_iter: int = 50,
          tol: float = 1e-4, stop_mode: str = "rel", return_states: ReturnStates = None,
          trace: bool = False, check_residual: bool = True, per_sample: bool = True,
          host_checks: Optional[bool] = None, **options) -> tuple[State, SolverInfo]:
    """Find z with f(z) = z, starting from ``z0`` (a tensor or tuple of tensors, batch on dim 0).

    ``max_iter`` is the number of calls of ``f``; the returned z after k calls is the k-th iterate.
    Each sample is frozen once its residual (``stop_mode`` "rel" or "abs") meets ``tol``; the solve
    ends when all have, or after ``max_iter`` calls. That per-sample stopping assumes the rows of
    dim 0 are independent samples (row i of f(z) depends on row i of z alone); for a state whose
    dim 0 is not a batch (e.g. a graph's ``(hidden, nodes)``), ``per_sample=False`` iterates every
    row until all meet ``tol``. ``tol=0`` is a fixed budget with no host-device synchronisation
    per step. ``return_states="all"`` (or a list of indices) keeps the iterates z_0..z_nfe;
    indices past ``nfe`` give the final state. ``solver`` takes TorchDEQ's names too
    ("fixed_point_iter"). ``options`` go to the solver (e.g. ``m``, ``tau``, ``lam``, ``history``
    for Anderson); unknown ones are an error. ``history`` (pairs of states in z0's layout) is
    flattened like z0.
    The check call of ``f`` that measures ``info.abs_residual``/``rel_residual`` is not in ``nfe``;
    a sample that met ``tol`` during the solve but whose returned state fails it warns (coupled
    rows). ``check_residual=False`` skips the call (for timing a budget of exactly ``max_iter``
    calls), leaving ``abs_residual``, ``rel_residual`` and ``converged`` as None.
    ``host_checks``: whether to read the checks' results on the host (the error for a non-finite
    z0, the warnings for diverged samples and for frozen samples failing the check). Reading them
    waits for the device, which a CUDA-graph capture or the ``meta`` device cannot do. None (the
    default) turns them off only for a fixed budget (``tol=0``, ``check_residual=False``) off the
    CPU: such a solve then makes no host synchronisation at all; ``info.diverged`` is still set.

    Example:
        >>> z, info = solve(lambda z: 0.5 * z + 1, torch.zeros(2, 3), solver="fixed_point_iter", tol=1e-8)
        >>> bool(info.converged.all()), round(z[0, 0].item(), 6)
        (True, 2.0)
    """
    solver = SOLVER_ALIASES.get(solver, solver) if isinstance(solver, str) else solver
    fn, return_states = _check_arguments(solver, max_iter, tol, stop_mode, return_states, trace, per_sample,
                                         options)
    if _PER_SAMPLE[solver]:
        options = {**options, PER_SAMPLE: per_sample}
    layout = StateLayout(z0, "z0")
    if options.get(HISTORY) is not None:
        options[HISTORY] = _flat_history(options[HISTORY], layout)
    device = as_tuple(z0)[0].device
    host_checks = _host_checks(host_checks, tol, check_residual, device)
    f_autocast = caller_autocast(device)
    with torch.no_grad(), solver_ops(device):  # Anderson's small system stays in the states' dtype
        z0_flat = layout.flatten(z0)
        if host_checks:
            _finite(z0_flat)
        f_flat = _CountedF(f, layout, f_autocast)
        z, info = fn(f_flat, z0_flat, max_iter=max_iter, tol=float(tol), stop_mode=stop_mode,
                     return_states=return_states, trace=trace, **options)
        _fill_counts(info, f_flat.calls, z)
        if check_residual:
            _check_returned(f_flat(z), z, info, solver, float(tol), stop_mode, host_checks)
        if info.states is not None:
            info.states = [layout.unflatten(s) for s in info.states]
        if host_checks and bool(info.diverged.any()):
            _warn_diverged(info.diverged, solver)
    return layout.unflatten(z), info


def _fill_counts(info: SolverInfo, calls: int, z: Tensor) -> None:
    """``info.nfe`` from the counted calls; ``steps`` and ``diverged`` where the solver left them unset."""
    info.nfe = calls
    if info.steps is None:
        info.steps = torch.full((z.shape[0],), calls, dtype=torch.long, device=z.device)
    if info.diverged is None:
        info.diverged = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)


def _warn_diverged(diverged: Tensor, solver: str) -> None:
    bad = torch.nonzero(diverged).flatten().tolist()
    warnings.warn(f"cdeq.solve(solver={solver!r}): sample(s) {bad} diverged (non-finite iterate, or residual "
                  f"> {DIVERGENCE_RATIO:g}x its initial value); they are frozen at their last finite iterate",
                  RuntimeWarning, stacklevel=3)


def _flat_history(history: Sequence, layout: StateLayout) -> list[tuple[Tensor, Tensor]]:
    """The ``history`` option's pairs (z_i, f(z_i)), each state checked against z0's layout, flattened."""
    if isinstance(history, (str, Tensor)) or not isinstance(history, Sequence):
        raise ValueError(f"history: expected a list of (z, f(z)) pairs of states, got {type(history).__name__}")
    flat = []
    for i, pair in enumerate(history):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"history[{i}]: expected a pair (z, f(z)), got {type(pair).__name__}")
        for name, state in zip(("z", "f(z)"), pair):
            layout.check(state, f"history[{i}] {name}")
        flat.append((layout.flatten(pair[0]), layout.flatten(pair[1])))
    return flat


def _host_checks(host_checks: Optional[bool], tol: float, check_residual: bool, device: torch.device) -> bool:
    """``solve``'s ``host_checks`` resolved: None is on unless a fixed budget runs off the CPU."""
    if host_checks is None:
        return tol > 0 or check_residual or host_reads_are_free(device)
    if not isinstance(host_checks, bool):
        raise ValueError(f"host_checks: expected True, False or None (automatic), got {host_checks!r}")
    return host_checks


def _finite(z0: Tensor) -> None:
    finite = torch.isfinite(z0).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        raise ValueError(f"z0 contains NaN or Inf in sample(s) {bad}")


# Rounding slack of the check: a frozen sample's check residual may differ from the one that met tol
# by a few ulps of ||f(z)|| (another reduction order), never by a factor of 2.
_CHECK_SLACK, _CHECK_ULPS = 2.0, 16.0


def _check_returned(fz: Tensor, z: Tensor, info: SolverInfo, solver: str, tol: float, stop_mode: str,
                    warn: bool) -> None:
    """Fill the residual fields of ``info`` from the check call ``fz = f(z)``, and (``warn``) warn
    about the samples that met ``tol`` during the solve but whose returned state fails it."""
    info.abs_residual = batch_norm2(fz - z)
    fz_norm = batch_norm2(fz)
    info.rel_residual = info.abs_residual / fz_norm.clamp_min(torch.finfo(torch.float32).tiny)
    r = info.rel_residual if stop_mode == "rel" else info.abs_residual
    info.converged = (r <= tol) & ~info.diverged
    if info.met_tol is None or tol == 0 or not warn:
        return
    scale = fz_norm if stop_mode == "rel" else torch.ones_like(fz_norm)
    limit = _CHECK_SLACK * tol * scale + _CHECK_ULPS * torch.finfo(z.dtype).eps * fz_norm
    failed = info.met_tol & (info.abs_residual > limit)
    if bool(failed.any()):
        bad = torch.nonzero(failed).flatten().tolist()
        warnings.warn(
            f"cdeq.solve(solver={solver!r}): sample(s) {bad} met tol={tol:g} ({stop_mode}) during the solve and "
            f"were frozen there, but the returned state fails it (residual(s) "
            f"{[round(float(x), 6) for x in r[failed][:5]]}). Per-sample stopping assumes independent batch "
            "rows (row i of f(z) depends only on row i of z); for a state whose dim 0 is not a batch, pass "
            "per_sample=False to stop on the whole batch", RuntimeWarning, stacklevel=3)


def vector_norm(x: Tensor) -> Tensor:
    """Per-row Euclidean norm of a ``(B, N)`` tensor, accumulated in float32 for 16-bit dtypes."""
    dtype = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
    return torch.linalg.vector_norm(x, dim=1, dtype=dtype)


def host_reads_are_free(device: torch.device) -> bool:
    """Whether reading a tensor's value on the host is free: on the CPU it waits for no device."""
    return device.type == "cpu"


class Monitor:
    """Per-sample stopping, divergence, trace and kept states of one solve (shared by all solvers).

    Each step a solver calls :meth:`observe` after the k-th call of ``f`` with the residual of
    z_{k-1} and gets the ``(B, 1)`` mask of samples whose iterate may advance to z_k (the others
    are frozen at z_{k-1}: it met tol, or diverged, now or before; with ``per_sample=False`` no
    sample freezes for meeting tol until all have); it computes the step for the whole batch,
    lets :meth:`select` keep the frozen samples' old iterates, calls :meth:`record` with z_k and
    stops when :meth:`done` says so. A handful of tiny ops per step; ``steps`` and
    ``diverged`` are derived once in :meth:`finish`.
    """

    def __init__(self, z0: Tensor, *, max_iter: int, tol: float, stop_mode: str,
                 return_states: ReturnStates, trace: bool, per_sample: bool = True) -> None:
        B, dev = z0.shape[0], z0.device
        self.tol, self.stop_abs, self.per_sample = tol, stop_mode == "abs", per_sample
        self.active = torch.ones(B, dtype=torch.bool, device=dev)
        self.healthy = torch.ones(B, dtype=torch.bool, device=dev)  # never non-finite or far above r0
        self.count = torch.zeros(B, dtype=torch.long, device=dev)  # NFE while active
        self.trace = torch.empty(max_iter, B, device=dev) if trace else None
        self.abs_trace = torch.empty(max_iter, B, device=dev) if trace else None
        self.keep_all = return_states == "all"
        self.keep = set() if return_states is None or self.keep_all else set(return_states)
        self.requested = return_states
        self.states: dict[int, Tensor] = {}
        self.limit: Optional[Tensor] = None
        # tol = 0 (a fixed budget): no sample can meet tol, so neither the relative residual (unless
        # traced) nor the per-sample count of steps (steps = nfe) is needed; only divergence freezes,
        # and then active == healthy.
        self.fixed_budget = tol == 0
        self.needs_rel = trace or not (self.stop_abs or self.fixed_budget)
        self.advance = (self.healthy if self.fixed_budget else self.active).unsqueeze(1)  # a view: kept current
        # Asking whether every sample advances is free on the CPU, and with tol > 0 done() needs the
        # answer anyway; only a fixed budget on an accelerator must not ask (it may run in a CUDA graph).
        self.may_ask = host_reads_are_free(dev) or not self.fixed_budget
        self.none_advance = False
        self.record(0, z0)

    def observe(self, k: int, abs_r: Tensor, fz_norm: Optional[Tensor]) -> Tensor:
        """Residual ``abs_r`` (and ||f(z)|| when :attr:`needs_rel`) of z_{k-1} -> advance mask."""
        if self.needs_rel:
            rel = abs_r / fz_norm.clamp_min(torch.finfo(torch.float32).tiny)
            if self.trace is not None:
                self.trace[k - 1] = rel
                self.abs_trace[k - 1] = abs_r
        if self.limit is None:  # residual above this (or NaN) = diverged; none if r0 = 0 or non-finite
            big = torch.finfo(abs_r.dtype).max
            self.limit = torch.where(abs_r > 0, DIVERGENCE_RATIO * abs_r, big).clamp(max=big)
        self.healthy &= abs_r <= self.limit
        if not self.fixed_budget:
            self.count += self.active
            self.active &= self.healthy
            above = (abs_r if self.stop_abs else rel) > self.tol
            self.active &= above if self.per_sample else above.any()
        return self.advance

    def select(self, new: Tensor, old: Tensor) -> Tensor:
        """z_k: ``new`` for the samples that advance this step, ``old`` for the frozen ones.

        The step is computed for the whole batch (a frozen sample's may be garbage, even NaN);
        when the host may be asked and every sample advances, ``new`` is returned as it is."""
        if self.may_ask:
            if bool(self.advance.all()):
                return new
            self.none_advance = not bool(self.advance.any())
        return torch.where(self.advance, new, old)

    def record(self, k: int, z: Tensor) -> None:
        """Keep z_k if it was asked for."""
        if self.keep_all or k in self.keep:
            self.states[k] = z.clone()

    def done(self) -> bool:
        """True once every sample is frozen (tol > 0 only; :meth:`select` asked)."""
        return self.tol > 0 and self.none_advance

    def finish(self, z: Tensor, nfe: int) -> SolverInfo:
        """The solver's part of :class:`SolverInfo` (residual fields are filled by :func:`solve`)."""
        if self.fixed_budget:
            self.active = self.healthy
        met_tol = ~self.active & self.healthy
        steps = torch.where(met_tol, self.count, torch.full_like(self.count, nfe))
        if self.keep_all:
            states = [self.states[k] for k in range(nfe + 1)]
        elif self.requested is None:
            states = None
        else:
            states = [self.states[k] if k in self.states else z.clone() for k in self.requested]
        trace = self.trace[:nfe] if self.trace is not None else None
        abs_trace = self.abs_trace[:nfe] if self.abs_trace is not None else None
        return SolverInfo(nfe=nfe, steps=steps, diverged=~self.healthy, trace=trace, states=states,
                          abs_trace=abs_trace, met_tol=met_tol if not self.fixed_budget else None)
