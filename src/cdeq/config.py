"""DEQ settings as one validated dataclass, and TorchDEQ's command-line flags for it.

:class:`DEQConfig` holds the forward solver, the backward pass, returned states, weight
normalisation and regularisation settings; it is validated on construction, so a misspelled option
or a bad value fails at once with a message naming it. :func:`add_deq_args` adds TorchDEQ's flag
names (torchdeq paper Sec. 2.2-2.6) to an ``argparse`` parser and :meth:`DEQConfig.from_args`
turns the parsed flags into a config, so a TorchDEQ user's command line works unchanged.

Example:
    >>> parser = add_deq_args(argparse.ArgumentParser())
    >>> args = parser.parse_args("--ift --f_solver fixed_point_iter --b_max_iter 20".split())
    >>> cfg = DEQConfig.from_args(args)
    >>> cfg.backward, cfg.f_solver, cfg.b_max_iter
    ('implicit', 'fixed_point', 20)
"""
from __future__ import annotations

import argparse
import difflib
import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Iterable, Optional

from torch import nn

BACKWARDS = ("implicit", "phantom", "unroll")
STOP_MODES = ("rel", "abs")
NORM_TYPES = ("weight", "spectral", "none")
# TorchDEQ's names -> cdeq's names.
SOLVER_ALIASES = {"fixed_point_iter": "fixed_point", "simple_fixed_point_iter": "fixed_point"}
NORM_ALIASES = {"weight_norm": "weight", "spectral_norm": "spectral"}


class UnknownOptionError(TypeError, ValueError):
    """An option name that does not exist (a TypeError like any unexpected keyword, and a
    ValueError like any bad setting)."""


def check_options(given: Iterable[str], valid: Iterable[str], where: str) -> None:
    """Raise :class:`UnknownOptionError` naming the first unknown option, the closest valid one
    and all valid ones."""
    valid = list(valid)
    for name in given:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownOptionError(
                f"{where}: unknown option {name!r}.{hint} Valid options: {', '.join(valid)}"
            )


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a ValueError naming the field."""
    choices = tuple(choices)
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}{hint}")
    return value


def check_int(name: str, value: Any, low: int) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is an int >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")


def check_number(name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False,
                 high_open: bool = False) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is a finite real number in the interval.

    Finite means within float32's range: a larger setting becomes inf in the float32 tensors it scales.
    """
    float32_max = 3.4028234663852886e38
    real = isinstance(value, (int, float)) and not isinstance(value, bool)
    finite = real and abs(value) <= float32_max  # False for NaN too
    ok = finite and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open or high == math.inf else ']'}"
        what = "a finite number" if real and not finite else "a number"
        limit = f" (at most {float32_max:.4g} in magnitude, float32's largest)" if real and not finite else ""
        raise ValueError(f"{name}: expected {what} in {interval}{limit}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")


def _kwargs(name: str, value: Any) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{name}: expected a dict of solver keyword options, got {value!r}")


def _solver(name: str, value: Any) -> str:
    from cdeq.solvers import available_solvers

    value = SOLVER_ALIASES.get(value, value)
    return check_choice(name, value, available_solvers())


@dataclass(init=False)
class DEQConfig:
    """All settings of a DEQ, validated on construction (keyword arguments only).

    DEQ module (see :class:`cdeq.DEQ`):
        f_solver: forward solver; None picks "anderson" ("fixed_point" for ``backward="unroll"``).
            TorchDEQ's names are accepted ("fixed_point_iter" -> "fixed_point").
        f_max_iter, f_tol, f_stop_mode, f_options: its step budget, tolerance, "rel" | "abs",
            and extra keyword options for the solver.
        eval_max_iter: the forward budget in eval mode (None: f_max_iter).
        backward: "implicit" (Eq. 2-3), "phantom" (Eq. 5-6) or "unroll" (backpropagation through
            damped fixed-point steps, optionally with gradient checkpointing, ``checkpoint``).
        b_solver, b_max_iter, b_tol, b_stop_mode, b_options: the solver of the implicit backward
            linear system (Eq. 3).
        phantom_steps, tau: the k damped steps z <- tau f(z) + (1 - tau) z of Eq. 5; tau is also
            the damping of the unrolled steps.
        per_sample: stop each sample once it meets its tolerance (True), or iterate the whole
            batch until every sample has (False: for states whose dim 0 is not a batch, e.g. a
            graph's ``(hidden, nodes)``); both the forward and the implicit backward solve.
        return_steps: solver steps whose states a training forward returns in ``info.states``.
    Training recipe:
        norm_type ("weight" | "spectral" | "none"), norm_scale, norm_clip: :func:`cdeq.apply_norm`.
        jac_loss_weight, jac_loss_freq: weight of :func:`cdeq.jacobian_penalty` and the fraction
            of training steps that compute it (Eq. 17-18).
        gamma: the decay of :func:`cdeq.fixed_point_correction` (Eq. 19).

    Example:
        >>> DEQConfig(f_solver="fixed_point", backward="phantom", phantom_steps=5, tau=0.6).tau
        0.6
        >>> DEQConfig(f_slover="anderson")
        Traceback (most recent call last):
        ...
        cdeq.config.UnknownOptionError: DEQConfig: unknown option 'f_slover'. Did you mean 'f_solver'? ...
    """

    f_solver: Optional[str] = None
    f_max_iter: int = 30
    f_tol: float = 1e-4
    f_stop_mode: str = "rel"
    f_options: dict = field(default_factory=dict)
    eval_max_iter: Optional[int] = None
    backward: str = "implicit"
    b_solver: str = "anderson"
    b_max_iter: int = 30
    b_tol: float = 1e-6
    b_stop_mode: str = "rel"
    b_options: dict = field(default_factory=dict)
    phantom_steps: int = 1
    tau: float = 1.0
    checkpoint: bool = False
    per_sample: bool = True
    return_steps: Optional[tuple] = None
    norm_type: str = "weight"
    norm_scale: bool = True
    norm_clip: Optional[float] = None
    jac_loss_weight: float = 0.0
    jac_loss_freq: float = 0.0
    gamma: float = 0.8

    def __init__(self, **options: Any) -> None:
        check_options(options, [f.name for f in fields(self)], "DEQConfig")
        for f in fields(self):
            if f.name in options:
                setattr(self, f.name, options[f.name])
            else:
                setattr(self, f.name, f.default if f.default_factory is MISSING else f.default_factory())
        self._validate()

    def _validate(self) -> None:
        self.backward = check_choice("backward", self.backward, BACKWARDS)
        if self.f_solver is not None:
            self.f_solver = _solver("f_solver", self.f_solver)
            if self.backward == "unroll" and self.f_solver != "fixed_point":
                raise ValueError(
                    f"f_solver: backward='unroll' differentiates through damped fixed-point steps "
                    f"(Eq. 5), so f_solver must be 'fixed_point' or None, got {self.f_solver!r}"
                )
        self.b_solver = _solver("b_solver", self.b_solver)
        for name in ("f_max_iter", "phantom_steps"):
            check_int(name, getattr(self, name), 0 if name == "f_max_iter" else 1)
        check_int("b_max_iter", self.b_max_iter, 1)
        if self.eval_max_iter is not None:
            check_int("eval_max_iter", self.eval_max_iter, 0)
        for name in ("f_tol", "b_tol", "jac_loss_weight"):
            check_number(name, getattr(self, name), 0.0)
        check_number("tau", self.tau, 0.0, 1.0, low_open=True)
        check_number("gamma", self.gamma, 0.0, 1.0, low_open=True)
        check_number("jac_loss_freq", self.jac_loss_freq, 0.0, 1.0)
        check_choice("f_stop_mode", self.f_stop_mode, STOP_MODES)
        check_choice("b_stop_mode", self.b_stop_mode, STOP_MODES)
        _kwargs("f_options", self.f_options)
        _kwargs("b_options", self.b_options)
        check_bool("checkpoint", self.checkpoint)
        check_bool("per_sample", self.per_sample)
        check_bool("norm_scale", self.norm_scale)
        self.norm_type = check_choice("norm_type", NORM_ALIASES.get(self.norm_type, self.norm_type), NORM_TYPES)
        if self.norm_clip is not None:
            check_number("norm_clip", self.norm_clip, 0.0, low_open=True)
        if self.return_steps is not None:
            if isinstance(self.return_steps, (str, bytes)) or not hasattr(self.return_steps, "__iter__"):
                raise ValueError(f"return_steps: expected a sequence of solver steps, got {self.return_steps!r}")
            self.return_steps = tuple(self.return_steps)
            for step in self.return_steps:
                check_int("return_steps", step, 0)

    def apply_norm(self, module: nn.Module, **options: Any) -> nn.Module:
        """Apply this config's weight normalisation to ``module`` (nothing for norm_type "none").

        ``options`` (e.g. ``exclude``) go to :func:`cdeq.apply_norm`."""
        from cdeq.norm import apply_norm

        if self.norm_type == "none":
            return module
        return apply_norm(module, kind=self.norm_type, clip=self.norm_clip, scale=self.norm_scale, **options)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DEQConfig":
        """Build a config from flags parsed by a parser that :func:`add_deq_args` extended."""
        if args.indexing and args.n_states:
            raise ValueError("--indexing and --n_states: give one of them, not both")
        return_steps = None
        if args.indexing:
            return_steps = tuple(args.indexing)
        elif args.n_states:
            check_int("--n_states", args.n_states, 0)
            n = args.n_states
            if n > args.f_max_iter:
                raise ValueError(
                    f"--n_states {n} with --f_max_iter {args.f_max_iter}: the states are spread over the solver's "
                    f"steps, so at most {args.f_max_iter} distinct ones exist; give --n_states <= --f_max_iter "
                    "(with --f_max_iter 0 the DEQ returns z0 advanced by the phantom steps: no --n_states)")
            return_steps = tuple(round(args.f_max_iter * (i + 1) / n) for i in range(n))
        ift = args.ift or args.hook_ift
        backward = args.backward or ("implicit" if ift else "phantom")
        if ift and backward != "implicit":
            raise ValueError(f"--ift asks for the implicit backward but --backward is {backward!r}")
        eval_max_iter = args.eval_f_max_iter
        if not eval_max_iter and args.eval_factor != 1.0:
            eval_max_iter = round(args.f_max_iter * args.eval_factor)
        return cls(
            f_solver=args.f_solver,
            f_max_iter=args.f_max_iter,
            f_tol=args.f_tol,
            f_stop_mode=args.f_stop_mode,
            eval_max_iter=eval_max_iter or None,
            backward=backward,
            b_solver=args.b_solver,
            b_max_iter=args.b_max_iter,
            b_tol=args.b_tol,
            b_stop_mode=args.b_stop_mode,
            phantom_steps=args.grad,
            tau=args.tau,
            checkpoint=args.mem_gc,
            return_steps=return_steps,
            norm_type=args.norm_type,
            norm_scale=not args.norm_no_scale,
            norm_clip=args.norm_clip_value if args.norm_clip else None,
            jac_loss_weight=args.jac_loss_weight,
            jac_loss_freq=args.jac_loss_freq,
            gamma=args.gamma,
        )


# The DEQConfig fields that configure the DEQ module itself.
_FIELDS = [f.name for f in fields(DEQConfig)]
DEQ_OPTIONS = tuple(_FIELDS[: _FIELDS.index("return_steps") + 1])


def add_deq_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add TorchDEQ's DEQ flags to ``parser`` (torchdeq paper Sec. 2.2-2.6); returns it.

    Example:
        >>> parser = add_deq_args(argparse.ArgumentParser())
        >>> args = parser.parse_args("--f_max_iter 0 --grad 12 --tau 1.0".split())  # BPTT-12
        >>> DEQConfig.from_args(args).phantom_steps
        12
    """
    d = DEQConfig()
    g = parser.add_argument_group("DEQ (TorchDEQ flags)")
    g.add_argument("--f_solver", default=None, help="forward solver: anderson, fixed_point (fixed_point_iter), ...")
    g.add_argument("--f_max_iter", type=int, default=d.f_max_iter, help="forward solver's maximum steps")
    g.add_argument("--f_tol", type=float, default=d.f_tol, help="forward solver's tolerance")
    g.add_argument("--f_stop_mode", default=d.f_stop_mode, choices=STOP_MODES)
    g.add_argument("--eval_f_max_iter", type=int, default=0, help="forward steps in eval mode (0: f_max_iter * eval_factor)")
    g.add_argument("--eval_factor", type=float, default=1.0, help="eval steps as a multiple of f_max_iter")
    g.add_argument("--b_solver", default=d.b_solver, help="solver of the implicit backward system (Eq. 3)")
    g.add_argument("--b_max_iter", type=int, default=d.b_max_iter)
    g.add_argument("--b_tol", type=float, default=d.b_tol)
    g.add_argument("--b_stop_mode", default=d.b_stop_mode, choices=STOP_MODES)
    g.add_argument("--ift", action="store_true", help="implicit differentiation (Eq. 2-3); otherwise phantom gradients")
    g.add_argument("--hook_ift", action="store_true", help="the same as --ift")
    g.add_argument("--backward", default=None, choices=BACKWARDS, help="overrides --ift: implicit | phantom | unroll")
    g.add_argument("--grad", type=int, default=d.phantom_steps, help="phantom gradient steps k (Eq. 5-6)")
    g.add_argument("--tau", type=float, default=d.tau, help="damping of the phantom/unrolled steps (Eq. 5)")
    g.add_argument("--mem_gc", "--checkpoint", dest="mem_gc", action="store_true",
                   help="gradient checkpointing of the unrolled steps")
    g.add_argument("--n_states", type=int, default=0, help="return n states spread evenly over the solve")
    g.add_argument("--indexing", type=int, nargs="*", default=[], help="return the states at these solver steps")
    g.add_argument("--gamma", type=float, default=d.gamma, help="fixed-point correction decay (Eq. 19)")
    g.add_argument("--norm_type", default="weight_norm", choices=("weight_norm", "spectral_norm", "none") + NORM_TYPES[:2])
    g.add_argument("--norm_no_scale", action="store_true", help="no learnable scale g (Eq. 15)")
    g.add_argument("--norm_clip", action="store_true", help="clip the rescaling factor (Eq. 16)")
    g.add_argument("--norm_clip_value", type=float, default=1.0, help="the clip threshold t (Eq. 16)")
    g.add_argument("--jac_loss_weight", type=float, default=d.jac_loss_weight, help="Jacobian regularisation weight (Eq. 17-18)")
    g.add_argument("--jac_loss_freq", type=float, default=d.jac_loss_freq, help="fraction of steps with the Jacobian loss")
    return parser
