"""TorchDEQ's ``torchdeq.utils``: :func:`add_deq_args` (every TorchDEQ flag, TorchDEQ's defaults)
and :func:`mixed_init`.

The parsed namespace goes to :func:`cdeq.compat.torchdeq.get_deq` and
:func:`cdeq.compat.torchdeq.norm.apply_norm` as in TorchDEQ. ``--jac_loss_weight``,
``--jac_loss_freq``, ``--jac_incremental``, ``--gamma`` and ``--sradius_mode`` are read by the
training script (as in TorchDEQ), not by the DEQ module.

Example:
    >>> args = add_deq_args(argparse.ArgumentParser()).parse_args("--grad 2 3 --n_states 2".split())
    >>> args.grad, args.f_solver, args.f_max_iter, args.f_tol
    ([2, 3], 'fixed_point_iter', 40, 0.001)
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence, Union

import torch

from cdeq.regularize import mixed_init as _mixed_init

__all__ = ["add_deq_args", "mixed_init"]

_SOLVERS = ["anderson", "broyden", "fixed_point_iter", "simple_fixed_point_iter"]


def _solver_flags(parser: argparse.ArgumentParser) -> None:
    for side, what in (("f", "forward"), ("b", "backward (implicit, Eq. 3)")):
        parser.add_argument(f"--{side}_solver", default="fixed_point_iter", type=str,
                            choices=_SOLVERS if side == "b" else None, help=f"{what} solver: {', '.join(_SOLVERS)}")
        parser.add_argument(f"--{side}_max_iter", type=int, default=40, help=f"{what} solver's maximum NFE")
        parser.add_argument(f"--{side}_tol", type=float, default=1e-3 if side == "f" else 1e-6,
                            help=f"{what} solver's tolerance")
        parser.add_argument(f"--{side}_stop_mode", type=str, default="abs", help=f"{what} solver's residual: abs | rel")
    parser.add_argument("--eval_factor", type=float, default=1.0, help="eval budget: f_max_iter times this")
    parser.add_argument("--eval_f_max_iter", type=int, default=0, help="eval budget (overrides eval_factor if > 0)")


def _norm_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--norm_type", default="weight_norm", type=str,
                        help="weight normalisation: none | weight_norm | spectral_norm (Eq. 13-16)")
    parser.add_argument("--norm_no_scale", action="store_true", help="fix the scale g at norm_target_norm")
    parser.add_argument("--norm_clip", action="store_true", help="clip the factor g / N(W) at norm_clip_value (Eq. 16)")
    parser.add_argument("--norm_clip_value", default=1.0, type=float, help="the clip threshold t of Eq. 16")
    parser.add_argument("--norm_target_norm", default=1.0, type=float, help="g when it is not learnt")
    parser.add_argument("--sn_n_power_iters", default=1, type=int, help="power-iteration steps per spectral norm")


def _training_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--core", default="sliced", type=str, help="DEQ graph in training: sliced | indexing")
    parser.add_argument("--ift", action="store_true", help="implicit differentiation (Eq. 2-3)")
    parser.add_argument("--hook_ift", action="store_true", help="the same as --ift in cdeq (warns once)")
    parser.add_argument("--n_states", type=int, default=1, help="number of states sampled for the losses")
    parser.add_argument("--indexing", type=int, nargs="+", default=[], help="solver steps of the sampled states")
    parser.add_argument("--gamma", type=float, default=0.8, help="decay of the fixed-point correction (Eq. 19)")
    parser.add_argument("--grad", type=int, nargs="+", default=[1], help="phantom gradient steps (Eq. 5-6), "
                                                                         "one value or one per sampled state")
    parser.add_argument("--tau", type=float, default=1.0, help="damping of the phantom gradient steps")
    parser.add_argument("--sup_gap", type=int, default=-1, help="also return every sup_gap-th phantom step")
    parser.add_argument("--sup_loc", type=int, nargs="+", default=[], help="also return these phantom steps")
    parser.add_argument("--jac_loss_weight", type=float, default=0.0, help="Jacobian penalty weight (Eq. 17-18)")
    parser.add_argument("--jac_loss_freq", type=float, default=0.0, help="fraction of steps with the penalty")
    parser.add_argument("--jac_incremental", type=int, default=0, help="training-script schedule of the weight")
    parser.add_argument("--sradius_mode", action="store_true", help="estimate the spectral radius in eval")


def add_deq_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add TorchDEQ's DEQ flags, with TorchDEQ's defaults, to ``parser``; returns it."""
    _solver_flags(parser)
    _norm_flags(parser)
    _training_flags(parser)
    return parser


def mixed_init(z_shape: Union[Sequence[int], torch.Size], device: Optional[torch.device] = None) -> torch.Tensor:
    """Half zeros, half standard Gaussian entries (cdeq: exactly half of each sample's entries;
    TorchDEQ: each entry with probability 1/2)."""
    return _mixed_init(tuple(z_shape), device=device)
