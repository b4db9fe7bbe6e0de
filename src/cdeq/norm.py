"""Weight and spectral normalisation for the weights of a DEQ layer (torchdeq paper Eq. 13-16).

:func:`apply_norm` reparameterises every ``weight`` of a module as
``W = V * min(t, g / N(V))`` (Eq. 15-16): ``N`` is the row-wise L2 norm (weight norm, Eq. 13) or
the largest singular value found by power iteration (spectral norm, Eq. 14), ``g`` a learnable
scale and ``t`` an optional clip. A DEQ calls its layer tens of times per forward, so the
normalised weight is computed once, by :func:`reset_norm` (which ``DEQModel.forward`` calls), and
every call of the layer reuses it. :func:`remove_norm` bakes the normalised weight back into a
plain parameter, leaving the function unchanged.

Modules with other parameter names (or a norm along another dimension, as ``ConvTranspose``'s
output channels on dim 1) are declared with :func:`register_norm_module`, or per call with
``rules``. A normalised module keeps its class name but becomes an instance of a subclass whose
``weight`` (each normalised parameter) is a property returning the cached weight (recomputed on
access only if stale, e.g. after an optimiser step without :func:`reset_norm`). ``copy.deepcopy``
works (the copy recomputes its weight); save it through its ``state_dict`` (``weight_v``,
``weight_g``, ``weight_u``), not by pickling the module.

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

from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from cdeq.config import NORM_ALIASES, check_choice

NORM_KINDS = ("weight", "spectral")
_ATTR = "_cdeq_norm"
_INIT_POWER_ITERS = 30
_EPS = 1e-12
Rule = tuple[tuple[str, ...], tuple[int, ...]]
_RULES: dict[type, Rule] = {}  # register_norm_module: module class -> (parameter names, norm dims)


def _unit(x: Tensor) -> Tensor:
    return x / x.norm().clamp_min(_EPS)


def _as_rule(names: Union[str, Sequence[str]], dims: Union[int, Sequence[int]], where: str) -> Rule:
    names = (names,) if isinstance(names, str) else tuple(names)
    dims = (dims,) if isinstance(dims, int) and not isinstance(dims, bool) else tuple(dims)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{where}: names must be a parameter name or a list of them, got {names!r}")
    if len(dims) != len(names) or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise ValueError(f"{where}: dims must be one int per name ({len(names)}), got {dims!r}")
    return names, dims


def register_norm_module(module_class: type, names: Union[str, Sequence[str]] = "weight",
                         dims: Union[int, Sequence[int]] = 0) -> None:
    """Make :func:`apply_norm` normalise the parameters ``names`` of every ``module_class``
    (exact type), each along its dimension in ``dims`` (the output dimension: rows of Eq. 13, the
    left side of Eq. 14), instead of the default rule (``weight`` along dim 0).

    Example:
        >>> register_norm_module(torch.nn.ConvTranspose1d, "weight", 1)  # its outputs are dim 1
        >>> apply_norm(torch.nn.ConvTranspose1d(4, 6, 3)).weight_g.shape
        torch.Size([1, 6, 1])
    """
    if not isinstance(module_class, type) or not issubclass(module_class, nn.Module):
        raise TypeError(f"register_norm_module: module_class must be an nn.Module subclass, got {module_class!r}")
    _RULES[module_class] = _as_rule(names, dims, "register_norm_module")


class _Normalization:
    """The normalisation of one parameter ``name`` of a module: its settings and how to compute it."""

    def __init__(self, module: nn.Module, name: str, dim: int, kind: str, clip: Optional[float], scale: bool,
                 target_norm: float, power_iters: int) -> None:
        self.name, self.kind, self.clip, self.scale, self.power_iters = name, kind, clip, scale, power_iters
        weight = module._parameters.pop(name)
        self.dim = dim % weight.dim()
        v = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        module.register_parameter(name + "_v", v)
        if kind == "spectral":
            u = _unit(torch.randn(v.shape[self.dim], dtype=v.dtype, device=v.device))
            module.register_buffer(name + "_u", u)
            with torch.no_grad():
                for _ in range(_INIT_POWER_ITERS):
                    self._power_step(module)
        with torch.no_grad():
            g = self._norm(module) if scale else torch.full_like(self._norm(module), target_norm)
        if scale:
            module.register_parameter(name + "_g", nn.Parameter(g.clone()))
        else:
            module.register_buffer(name + "_g", g)
        self.weight: Optional[Tensor] = None
        self.versions: tuple[int, ...] = ()
        self.compute(module)

    def __deepcopy__(self, memo: dict) -> "_Normalization":
        """A copy with the same settings and no cached weight (a non-leaf tensor cannot be deep
        copied); the copy's module recomputes it on first use."""
        copy = object.__new__(_Normalization)
        copy.__dict__.update(self.__dict__)
        copy.weight, copy.versions = None, ()
        return copy

    def _param(self, module: nn.Module, part: str) -> Tensor:
        return getattr(module, f"{self.name}_{part}")

    def _matrix(self, v: Tensor) -> Tensor:
        """V as a (rows, -1) matrix, its rows along the norm dimension."""
        return v.movedim(self.dim, 0).reshape(v.shape[self.dim], -1)

    def _power_step(self, module: nn.Module) -> None:
        """One power iteration on V (as a (rows, -1) matrix) refining the left singular vector u."""
        mat, u = self._matrix(self._param(module, "v").detach()), self._param(module, "u")
        u.copy_(_unit(mat @ _unit(mat.t() @ u)))

    def _norm(self, module: nn.Module) -> Tensor:
        """N(V) of Eq. 15, shaped to broadcast against V: row norms, or the top singular value."""
        v = self._param(module, "v")
        mat = self._matrix(v)
        if self.kind == "weight":
            shape = [1] * v.dim()
            shape[self.dim] = v.shape[self.dim]
            return mat.norm(dim=1).clamp_min(_EPS).reshape(shape)
        u = self._param(module, "u")
        right = _unit(mat.detach().t() @ u)
        return (u @ (mat @ right)).clamp_min(_EPS).reshape(1)

    def compute(self, module: nn.Module) -> None:
        """Cache ``W = V * min(t, g / N(V))`` (Eq. 15-16), differentiable in V and g."""
        if self.kind == "spectral" and module.training:
            with torch.no_grad():
                for _ in range(self.power_iters):
                    self._power_step(module)
        v, g = self._param(module, "v"), self._param(module, "g")
        factor = g / self._norm(module)
        if self.clip is not None:
            factor = factor.clamp(max=self.clip)
        self.weight = v * factor
        self.versions = (v._version, g._version)

    def stale(self, module: nn.Module) -> bool:
        """Whether the cached weight is missing or no longer matches V and g (e.g. after an
        optimiser step, or when it was computed without grad and grad is now wanted)."""
        v, g, w = self._param(module, "v"), self._param(module, "g"), self.weight
        return (
            w is None
            or self.versions != (v._version, g._version)
            or w.dtype != v.dtype
            or w.device != v.device
            or (torch.is_grad_enabled() and v.requires_grad and w.grad_fn is None)
        )


def _normalised_param(module: nn.Module, name: str) -> Tensor:
    """A normalised parameter of ``module``: the cached weight, recomputed only if stale
    (reset_norm was not called after the parameters changed)."""
    norm = module.__dict__[_ATTR][name]
    if norm.stale(module):
        norm.compute(module)
    return norm.weight


_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


def _normalised_class(cls: type, names: tuple[str, ...]) -> type:
    """A subclass of ``cls`` (same name, so the repr is unchanged) whose ``names`` are properties."""
    key = (cls, names)
    if key not in _CLASSES:
        props = {n: property(lambda m, n=n: _normalised_param(m, n)) for n in names}
        _CLASSES[key] = type(cls.__name__, (cls,), {**props, "_cdeq_base": cls})
    return _CLASSES[key]


def _excluded(name: str, module: nn.Module, exclude: tuple) -> bool:
    for item in exclude:
        if isinstance(item, str) and (name == item or name.startswith(item + ".")):
            return True
        if isinstance(item, type) and isinstance(module, item):
            return True
    return False


def _rule_for(name: str, module: nn.Module, rules: Optional[Mapping[type, Rule]]) -> Optional[Rule]:
    """The parameters of ``module`` to normalise: ``rules`` (exact type) when given, else a
    registered rule, else ``weight`` along dim 0 if it has 2 or more dimensions."""
    table = _RULES if rules is None else rules
    if type(module) in table:
        names, dims = table[type(module)]
        for n in names:
            if not isinstance(module._parameters.get(n), Tensor):
                raise ValueError(f"apply_norm: module {name or type(module).__name__!r} ({type(module).__name__}) "
                                 f"has no parameter {n!r} to normalise (its rule names {list(names)})")
        return names, dims
    weight = module._parameters.get("weight")
    if rules is None and weight is not None and weight.dim() >= 2:
        return ("weight",), (0,)
    return None


def _targets(module: nn.Module, exclude: tuple, rules: Optional[Mapping[type, Rule]]) -> list:
    """The (submodule, rule) pairs :func:`apply_norm` normalises; an error if there are none."""
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
        rule = _rule_for(name, sub, rules)
        if rule is not None:
            targets.append((sub, rule))
    if not targets:
        raise ValueError(
            f"apply_norm: {type(module).__name__} has no module with a weight of 2 or more "
            f"dimensions (or matching `rules`) left to normalise (exclude={exclude})"
        )
    return targets


def _check_settings(kind: str, clip: Optional[float], target_norm: float, power_iters: int) -> str:
    kind = check_choice("kind", NORM_ALIASES.get(kind, kind), NORM_KINDS)
    if clip is not None and not clip > 0:
        raise ValueError(f"clip: expected a positive threshold t (Eq. 16) or None, got {clip!r}")
    if isinstance(target_norm, bool) or not isinstance(target_norm, (int, float)) or not target_norm > 0:
        raise ValueError(f"target_norm: expected a positive number (the fixed g when scale=False), got {target_norm!r}")
    if isinstance(power_iters, bool) or not isinstance(power_iters, int) or power_iters < 1:
        raise ValueError(f"power_iters: expected an int >= 1, got {power_iters!r}")
    return kind


def apply_norm(
    module: nn.Module,
    kind: str = "weight",
    clip: Optional[float] = None,
    exclude: Iterable[Union[str, type]] = (),
    scale: bool = True,
    *,
    target_norm: float = 1.0,
    power_iters: int = 1,
    rules: Optional[Mapping[type, Rule]] = None,
) -> nn.Module:
    """Normalise the ``weight`` of ``module`` and of each of its submodules (Eq. 13-16).

    Args:
        kind: ``"weight"`` (row-wise L2 norm, Eq. 13) or ``"spectral"`` (largest singular value
            of the weight as a (rows, -1) matrix, by power iteration, Eq. 14); TorchDEQ's names
            ``"weight_norm"``/``"spectral_norm"`` are accepted.
        clip: the threshold t of Eq. 16: the rescaling factor g / N(W) is clipped to at most t.
        exclude: submodules to leave alone, by qualified name (``"block.0"``, which also excludes
            what lies below it) or by type (``nn.Embedding``).
        scale: learn the scale g, initialised to N(W) so that the function is unchanged (with no
            clip); with ``scale=False`` g is fixed at ``target_norm`` (1: unit rows, or spectral
            norm 1).
        power_iters: power-iteration steps per recomputation of a spectral norm in training.
        rules: ``{module type: (parameter names, norm dims)}``; when given, only modules of
            those exact types are normalised, on those parameters (see :func:`register_norm_module`).

    Without ``rules``, weights of fewer than two dimensions (the affine weights of LayerNorm,
    BatchNorm, ...) are not linear maps and are left alone. Returns ``module``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3), torch.nn.LayerNorm(3))
        >>> apply_norm(net, kind="spectral_norm", exclude=("1",))  # doctest: +ELLIPSIS
        Sequential(...)
    """
    kind = _check_settings(kind, clip, target_norm, power_iters)
    if rules is not None:
        rules = {cls: _as_rule(*rule, "rules") for cls, rule in rules.items()}
    for sub, (names, dims) in _targets(module, tuple(exclude), rules):
        sub.__dict__[_ATTR] = {n: _Normalization(sub, n, d, kind, clip, scale, target_norm, power_iters)
                               for n, d in zip(names, dims)}
        sub.__class__ = _normalised_class(type(sub), names)
    return module


def _normalised(module: nn.Module) -> Iterable[tuple[nn.Module, _Normalization]]:
    for sub in module.modules():
        for norm in sub.__dict__.get(_ATTR, {}).values():
            yield sub, norm


def reset_norm(module: nn.Module) -> None:
    """Recompute every normalised weight in ``module`` once; call it once per forward of the DEQ.

    In training mode a spectral norm also takes ``power_iters`` power-iteration steps. A module
    with no normalisation is left alone (a cheap no-op).
    """
    for sub, norm in _normalised(module):
        norm.compute(sub)


def remove_norm(module: nn.Module) -> nn.Module:
    """Undo :func:`apply_norm`: each normalised weight becomes a plain parameter holding the
    value the next forward would use, so the function is unchanged. Returns ``module``."""
    subs = {id(sub): sub for sub, _ in _normalised(module)}
    for sub in subs.values():
        norms = sub.__dict__[_ATTR]
        with torch.no_grad():
            weights = {n: getattr(sub, n).detach().clone() for n in norms}
        sub.__class__ = sub._cdeq_base
        del sub.__dict__[_ATTR]
        for n, norm in norms.items():
            requires_grad = getattr(sub, n + "_v").requires_grad
            for part in ("v", "g") + (("u",) if norm.kind == "spectral" else ()):
                delattr(sub, f"{n}_{part}")
            sub.register_parameter(n, nn.Parameter(weights[n], requires_grad=requires_grad))
    return module
