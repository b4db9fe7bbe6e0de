"""The four-method protocol every DEQ model in cdeq follows.

Solvers, the DEQ module, the C-DEQ student, HyperDEQ and the pipeline wrap any model through
these methods alone, without knowing its domain:

- ``inject(x) -> u``: the input injection, computed once per input;
- ``layer(z, u) -> z``: one application of f_theta, the weight-tied layer (z* = f(z*, u), Eq. 1 of
  the C-DEQ paper);
- ``readout(z) -> logits``: the task head applied to a state;
- ``init_state(u) -> z0``: the solver's starting state (zeros by default).

States are a tensor or a tuple of tensors with the batch on dimension 0. For a whole-graph task the
batch is one graph: states are ``(1, num_nodes, dim)``.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import Tensor, nn

from cdeq.config import check_int
from cdeq.precision import autocast_layer
from cdeq.state import State, StateLayout, map_state


class _DeclaresFeatureDim(type(nn.Module)):
    """Checks, once a DEQModel is constructed, that its class or ``__init__`` set ``feature_dim``."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        model = super().__call__(*args, **kwargs)
        dim = getattr(model, "feature_dim", None)
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(
                f"{cls.__name__}: a DEQModel must declare feature_dim, the dimension of its state parts that "
                "holds features (1 for (B, C, H, W) maps, -1 for (B, L, d) tokens and (1, N, d) graph nodes), as "
                f"a class attribute or in __init__; got {dim!r}")
        return model


class DEQModel(nn.Module, metaclass=_DeclaresFeatureDim):
    """Base class of the DEQ models: the protocol plus a default forward pass.

    Subclasses implement :meth:`inject`, :meth:`layer` and :meth:`readout`, and must declare
    ``feature_dim``: the dimension of every state part that holds features (1 for ``(B, C, H, W)``
    maps, -1 for ``(B, L, d)`` tokens and ``(1, N, d)`` graph nodes). The C-DEQ student uses it to
    append its time channel (Eq. 8); there is no default, so a model that forgets it fails at
    construction (a wrong default would put the time channel along, e.g., the image width).

    ``self.deq`` (a :class:`cdeq.DEQ`) solves for the fixed point in :meth:`forward`; set it with
    :meth:`set_deq` or in the constructor.

    ``amp`` (None or "bf16", set for a block by :func:`cdeq.precision.amp_layers`): every subclass's
    :meth:`layer` is wrapped so that it then runs under bf16 autocast and returns the state's dtype.
    """

    feature_dim: int
    amp: Optional[str] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "layer" in cls.__dict__:
            cls.layer = autocast_layer(cls.__dict__["layer"])

    def inject(self, x: Any) -> Any:
        raise NotImplementedError

    def layer(self, z: State, u: Any) -> State:
        raise NotImplementedError

    def readout(self, z: State) -> Tensor:
        raise NotImplementedError

    def init_state(self, u: Any) -> State:
        raise NotImplementedError

    def set_deq(self, deq: nn.Module) -> "DEQModel":
        self.deq = deq
        return self

    def set_warm_start(self, estimator: Optional[Any], nfe: int = 1) -> "DEQModel":
        """Start every solve of :meth:`equilibrium` (and so :meth:`forward`) from
        ``estimator.state(x, nfe)`` instead of :meth:`init_state`: a trained C-DEQ student (or
        HyperDEQ) as the initialiser of a DEQ trained or fine-tuned afterwards. ``None`` removes it.

        The estimate is computed without gradients (z0 is a constant of the solve); its ``nfe``
        network calls come on top of the solve's ``info.nfe``. The estimator is put in eval mode and
        is not a submodule: the model's ``parameters()``, ``state_dict()`` and ``to()`` leave it alone.

        Example:
            >>> model.set_warm_start(student, nfe=1)     # doctest: +SKIP
            >>> logits, info = model(x)                  # the solve starts at student.state(x, 1)
        """
        if estimator is None:
            self.__dict__.pop("_warm_start", None)
            return self
        if not callable(getattr(estimator, "state", None)):
            raise TypeError(f"set_warm_start: estimator must have a state(x, nfe) method (a ConsistencyDEQ or "
                            f"HyperDEQ), got {type(estimator).__name__}")
        check_int("nfe", nfe, 1)
        if isinstance(estimator, nn.Module):
            estimator.eval()
        self.__dict__["_warm_start"] = (estimator, nfe)  # not registered: the estimator is no parameter of this model
        return self

    def forward(self, x: Any, **deq_kwargs: Any) -> tuple[Tensor, Any]:
        """Solve z* = layer(z*, inject(x)) with ``self.deq`` and return ``(readout(z*), info)``."""
        z, info = self.equilibrium(x, **deq_kwargs)
        return self.readout(z), info

    def equilibrium(self, x: Any, **deq_kwargs: Any) -> tuple[State, Any]:
        """``(z*, info)``: the fixed point of ``layer(., inject(x))`` found by ``self.deq``, started
        from :meth:`init_state` or from the warm start set by :meth:`set_warm_start`."""
        from cdeq.norm import reset_norm

        reset_norm(self)
        u = self.inject(x)
        return self.deq(lambda z: self.layer(z, u), self._start(x, u), **deq_kwargs)

    def _start(self, x: Any, u: Any) -> State:
        """The solve's z0: :meth:`init_state`, or the warm start's estimate in the same layout."""
        z0 = self.init_state(u)
        if "_warm_start" not in self.__dict__:
            return z0
        estimator, nfe = self.__dict__["_warm_start"]
        with torch.no_grad():
            z = estimator.state(x, nfe)
        StateLayout(z0, "init_state(u)").check(z, f"the warm start's state(x, {nfe})")
        return z

    def truncated_solve(self, x: Any, nfe: Optional[int] = None, solver: str = "anderson",
                        check_residual: bool = True, *, k: Optional[int] = None, **options: Any) -> tuple[State, Any]:
        """The solver's iterate after ``nfe`` calls of the layer from ``init_state``, no tolerance
        (the "DEQ" rows of the C-DEQ paper's tables). Returns ``(z, info)``; ``options`` go to
        :func:`cdeq.solve` (e.g. ``m`` for Anderson). ``k=`` is the old name of ``nfe``
        (deprecated)."""
        from cdeq.solvers import solve

        if k is not None:
            if nfe is not None:
                raise TypeError("truncated_solve: give nfe (k is its deprecated name), not both")
            warnings.warn("truncated_solve(k=...) is deprecated: the budget is called nfe, as everywhere in cdeq",
                          DeprecationWarning, stacklevel=2)
            nfe = k
        if nfe is None:
            raise TypeError("truncated_solve: missing the budget nfe (number of layer calls)")
        u = self.inject(x)
        return solve(lambda z: self.layer(z, u), self.init_state(u), solver=solver, max_iter=nfe, tol=0.0,
                     check_residual=check_residual, **options)


def zeros_like_state(z: State) -> State:
    """A zero state with the structure, shapes and dtype of ``z``."""
    return map_state(torch.zeros_like, z)
