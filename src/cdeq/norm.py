"""Weight and spectral normalisation for the weights of a DEQ layer (torchdeq paper Eq. 13-16).

:func:`apply_norm` reparameterises every ``weight`` of a module as
``W = V * min(t, g / N(V))`` (Eq. 15-16): ``N`` is the row-wise L2 norm (weight norm, Eq. 13) or
the largest singular value found by power iteration (spectral norm, Eq. 14), ``g`` a learnable
scale and ``t`` an optional clip. A DEQ calls its layer tens of times per forward, so the
normalised weight is computed once, by :func:`reset_norm` (which ``DEQModel.forward`` calls), and
every call of the layer reuses it. :func:`remove_norm` bakes the normalised weight back into a
plain parameter, leaving the function unchanged.

A normalised module keeps its class name but becomes an instance of a subclass whose ``weight``
is a property returning the cached weight (recomputed on access only if stale, e.g. after an
optimiser step without :func:`reset_norm`). ``copy.deepcopy`` works (the copy recomputes its
weight); save it through its ``state_dict`` (``weight_v``, ``weight_g``, ``weight_u``), not by
pickling the module.

Example:
    >>> layer = torch.nn.Linear(8, 8)
    >>> apply_norm(layer, kind="spectral", clip=1.0)
    Linear(in_features=8, out_features=8, bias=True)
    >>> reset_norm(layer)          # once per forward of the DEQ
    >>> y = layer(torch.randn(2, 8))
    >>> remove_norm(layer)         # a plain nn.Linear again, same function
    Linear(in_features=8, out_features=8, bias=True)
"""
from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch import Tensor, nn

from cdeq.config import check_choice

NORM_KINDS = ("weight", "spectral")
_ATTR = "_cdeq_norm"
_INIT_POWER_ITERS = 30
_EPS = 1e-12


def _unit(x: Tensor) -> Tensor:
    return x / x.norm().clamp_min(_EPS)


class _Normalization:
    """The normalisation of one module's ``weight``: its settings and how to compute it."""

    def __init__(self, module: nn.Module, kind: str, clip: Optional[float], scale: bool) -> None:
        self.kind, self.clip, self.scale = kind, clip, scale
        weight = module._parameters.pop("weight")
        v = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        module.register_parameter("weight_v", v)
        if kind == "spectral":
            u = _unit(torch.randn(v.shape[0], dtype=v.dtype, device=v.device))
            module.register_buffer("weight_u", u)
            with torch.no_grad():
                for _ in range(_INIT_POWER_ITERS):
                    self._power_step(module)
        with torch.no_grad():
            g = self._norm(module) if scale else torch.ones_like(self._norm(module))
        if scale:
            module.register_parameter("weight_g", nn.Parameter(g.clone()))
        else:
            module.register_buffer("weight_g", g)
        self.weight: Optional[Tensor] = None
        self.versions: tuple[int, ...] = ()
        self.compute(module)

    def __deepcopy__(self, memo: dict) -> "_Normalization":
        """A copy with the same settings and no cached weight (a non-leaf tensor cannot be deep
        copied); the copy's module recomputes it on first use."""
        copy = object.__new__(_Normalization)
        copy.kind, copy.clip, copy.scale, copy.weight, copy.versions = self.kind, self.clip, self.scale, None, ()
        return copy

    def _power_step(self, module: nn.Module) -> None:
        """One power iteration on V (as a (rows, -1) matrix) refining the left singular vector u."""
        mat = module.weight_v.detach().reshape(module.weight_v.shape[0], -1)
        v = _unit(mat.t() @ module.weight_u)
        module.weight_u.copy_(_unit(mat @ v))

    def _norm(self, module: nn.Module) -> Tensor:
        """N(V) of Eq. 15, shaped to broadcast against V: row norms, or the top singular value."""
        v = module.weight_v
        mat = v.reshape(v.shape[0], -1)
        if self.kind == "weight":
            return mat.norm(dim=1).clamp_min(_EPS).reshape(-1, *([1] * (v.dim() - 1)))
        u = module.weight_u
        right = _unit(mat.detach().t() @ u)
        return (u @ (mat @ right)).clamp_min(_EPS).reshape(1)

    def compute(self, module: nn.Module) -> None:
        """Cache ``W = V * min(t, g / N(V))`` (Eq. 15-16), differentiable in V and g."""
        if self.kind == "spectral" and module.training:
            with torch.no_grad():
                self._power_step(module)
        factor = module.weight_g / self._norm(module)
        if self.clip is not None:
            factor = factor.clamp(max=self.clip)
        self.weight = module.weight_v * factor
        self.versions = (module.weight_v._version, module.weight_g._version)

    def stale(self, module: nn.Module) -> bool:
        """Whether the cached weight is missing or no longer matches V and g (e.g. after an
        optimiser step, or when it was computed without grad and grad is now wanted)."""
        v, w = module.weight_v, self.weight
        return (
            w is None
            or self.versions != (v._version, module.weight_g._version)
            or w.dtype != v.dtype
            or w.device != v.device
            or (torch.is_grad_enabled() and v.requires_grad and w.grad_fn is None)
        )


def _normalised_weight(module: nn.Module) -> Tensor:
    """``module.weight`` of a normalised module: the cached weight, recomputed only if stale
    (reset_norm was not called after the parameters changed)."""
    norm = module.__dict__[_ATTR]
    if norm.stale(module):
        norm.compute(module)
    return norm.weight


_CLASSES: dict[type, type] = {}


def _normalised_class(cls: type) -> type:
    """A subclass of ``cls`` (same name, so the repr is unchanged) whose ``weight`` is a property."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (cls,), {"weight": property(_normalised_weight), "_cdeq_base": cls})
    return _CLASSES[cls]


def _excluded(name: str, module: nn.Module, exclude: tuple) -> bool:
    for item in exclude:
        if isinstance(item, str) and (name == item or name.startswith(item + ".")):
            return True
        if isinstance(item, type) and isinstance(module, item):
            return True
    return False


def apply_norm(
    module: nn.Module,
    kind: str = "weight",
    clip: Optional[float] = None,
    exclude: Iterable[Union[str, type]] = (),
    scale: bool = True,
) -> nn.Module:
    """Normalise the ``weight`` of ``module`` and of each of its submodules (Eq. 13-16).

    Args:
        kind: ``"weight"`` (row-wise L2 norm, Eq. 13) or ``"spectral"`` (largest singular value
            of the weight as a (rows, -1) matrix, by power iteration, Eq. 14).
        clip: the threshold t of Eq. 16: the rescaling factor g / N(W) is clipped to at most t.
        exclude: submodules to leave alone, by qualified name (``"block.0"``, which also excludes
            what lies below it) or by type (``nn.Embedding``).
        scale: learn the scale g, initialised to N(W) so that the function is unchanged (with no
            clip); with ``scale=False`` g is fixed at 1 (unit rows, or spectral norm 1).

    Weights of fewer than two dimensions (the affine weights of LayerNorm, BatchNorm, ...) are
    not linear maps and are left alone. Returns ``module``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3), torch.nn.LayerNorm(3))
        >>> apply_norm(net, kind="weight", exclude=("1",))  # doctest: +ELLIPSIS
        Sequential(...)
    """
    check_choice("kind", kind, NORM_KINDS)
    if clip is not None and not clip > 0:
        raise ValueError(f"clip: expected a positive threshold t (Eq. 16) or None, got {clip!r}")
    exclude = tuple(exclude)
    for item in exclude:
        if not isinstance(item, (str, type)):
            raise TypeError(f"exclude: expected module names (str) or module types, got {item!r}")
    targets = []
    for name, sub in module.named_modules():
        if _excluded(name, sub, exclude):
            continue
        if _ATTR in sub.__dict__:
            raise RuntimeError(
                f"apply_norm: module {name or type(sub).__name__!r} is already normalised; "
                "call remove_norm first"
            )
        weight = sub._parameters.get("weight")
        if weight is not None and weight.dim() >= 2:
            targets.append(sub)
    if not targets:
        raise ValueError(
            f"apply_norm: {type(module).__name__} has no module with a weight of 2 or more "
            f"dimensions left to normalise (exclude={exclude})"
        )
    for sub in targets:
        sub.__dict__[_ATTR] = _Normalization(sub, kind, clip, scale)
        sub.__class__ = _normalised_class(type(sub))
    return module


def _normalised(module: nn.Module) -> Iterable[tuple[nn.Module, _Normalization]]:
    for sub in module.modules():
        norm = sub.__dict__.get(_ATTR)
        if norm is not None:
            yield sub, norm


def reset_norm(module: nn.Module) -> None:
    """Recompute every normalised weight in ``module`` once; call it once per forward of the DEQ.

    In training mode a spectral norm also takes one power-iteration step. A module with no
    normalisation is left alone (a cheap no-op).
    """
    for sub, norm in _normalised(module):
        norm.compute(sub)


def remove_norm(module: nn.Module) -> nn.Module:
    """Undo :func:`apply_norm`: each normalised weight becomes a plain ``weight`` parameter
    holding the value the next forward would use, so the function is unchanged. Returns ``module``."""
    for sub, norm in list(_normalised(module)):
        with torch.no_grad():
            weight = sub.weight.detach().clone()
        requires_grad = sub.weight_v.requires_grad
        sub.__class__ = sub._cdeq_base
        del sub.__dict__[_ATTR]
        del sub.weight_v, sub.weight_g
        if norm.kind == "spectral":
            del sub.weight_u
        sub.weight = nn.Parameter(weight, requires_grad=requires_grad)
    return module
