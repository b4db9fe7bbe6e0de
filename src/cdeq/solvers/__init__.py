"""Fixed-point solvers behind :func:`cdeq.solve`: ``fixed_point``, ``anderson``, ``broyden``."""
from cdeq.solvers.anderson import anderson
from cdeq.solvers.broyden import broyden
from cdeq.solvers.base import SolverInfo, available_solvers, register_solver, solve
from cdeq.solvers.fixed_point import fixed_point

register_solver("fixed_point", fixed_point)
register_solver("anderson", anderson)
register_solver("broyden", broyden)

__all__ = ["solve", "SolverInfo", "register_solver", "available_solvers"]
