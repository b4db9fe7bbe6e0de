"""cdeq: deep equilibrium models and Consistency DEQs (C-DEQ) for PyTorch.

The toolkit's public names are importable from the top level; they load lazily so that
``import cdeq`` stays cheap and a part's import error names that part.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "solve": "cdeq.solvers",
    "SolverInfo": "cdeq.solvers",
    "register_solver": "cdeq.solvers",
    "available_solvers": "cdeq.solvers",
    "DEQ": "cdeq.deq",
    "apply_norm": "cdeq.norm",
    "reset_norm": "cdeq.norm",
    "remove_norm": "cdeq.norm",
    "register_norm_module": "cdeq.norm",
    "VariationalDropout": "cdeq.dropout",
    "reset_dropout": "cdeq.dropout",
    "jacobian_penalty": "cdeq.regularize",
    "spectral_radius": "cdeq.regularize",
    "fixed_point_correction": "cdeq.regularize",
    "mixed_init": "cdeq.regularize",
    "DEQConfig": "cdeq.config",
    "add_deq_args": "cdeq.config",
    "DEQModel": "cdeq.models",
}

__all__ = sorted(_EXPORTS) + ["consistency", "baselines", "models", "data", "tasks", "compat"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in ("consistency", "baselines", "models", "data", "tasks", "solvers", "backward", "compat"):
        return importlib.import_module(f"cdeq.{name}")
    raise AttributeError(f"module 'cdeq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
