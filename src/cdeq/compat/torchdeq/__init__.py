"""TorchDEQ 0.1.0's API on cdeq: replace the import prefix ``torchdeq`` by ``cdeq.compat.torchdeq``.

The modules mirror TorchDEQ's: :mod:`.core` (``get_deq``, ``reset_deq``, ``register_deq``),
:mod:`.solver` (``get_solver``), :mod:`.norm` (``apply_norm``, ``reset_norm``, ``remove_norm``,
``register_norm_module``), :mod:`.utils` (``add_deq_args``, ``mixed_init``), :mod:`.loss`
(``fp_correction``, ``jac_reg``, ``power_method``) and :mod:`.dropout` (``VariationalDropout``...,
``reset_dropout``). The layer only translates names, defaults and return values; the solves,
backward passes, normalisation, dropout and regularisers are cdeq's. What behaves differently
warns once, saying what cdeq does instead; ``docs/migrating-from-torchdeq.md`` lists it all.

Example:
    >>> import torch
    >>> from cdeq.compat.torchdeq import get_deq
    >>> deq = get_deq(f_solver="anderson", f_max_iter=50, f_tol=1e-8)
    >>> z_out, info = deq(lambda z: 0.5 * z + 1, torch.zeros(2, 3))
    >>> round(z_out[-1][0, 0].item(), 5), sorted(info)
    (2.0, ['abs_lowest', 'abs_trace', 'nstep', 'rel_lowest', 'rel_trace', 'sradius'])
"""
from cdeq.compat.torchdeq.core import DEQIndexing, DEQSliced, get_deq, register_deq, reset_deq
from cdeq.compat.torchdeq.dropout import (VariationalDropout, VariationalDropout1d, VariationalDropout2d,
                                          VariationalDropout3d, VariationalDropToken1d, VariationalDropToken2d,
                                          VariationalDropToken3d, reset_dropout)
from cdeq.compat.torchdeq.loss import fp_correction, jac_reg, power_method, register_weight_func
from cdeq.compat.torchdeq.norm import apply_norm, register_norm, register_norm_module, remove_norm, reset_norm
from cdeq.compat.torchdeq.solver import SolverStat, get_solver
from cdeq.compat.torchdeq.utils import add_deq_args, mixed_init

__all__ = ["get_deq", "reset_deq", "register_deq", "DEQIndexing", "DEQSliced", "get_solver", "SolverStat",
           "apply_norm", "reset_norm", "remove_norm", "register_norm", "register_norm_module", "add_deq_args",
           "mixed_init", "fp_correction", "jac_reg", "power_method", "register_weight_func", "VariationalDropout",
           "VariationalDropout1d", "VariationalDropout2d", "VariationalDropout3d", "VariationalDropToken1d",
           "VariationalDropToken2d", "VariationalDropToken3d", "reset_dropout"]
