"""TorchDEQ's ``torchdeq.norm`` on :mod:`cdeq.norm` (torchdeq paper Eq. 13-16).

TorchDEQ normalises the modules of the types it knows (``nn.Linear``, ``nn.Conv1d/2d/3d`` along
dim 0, ``nn.ConvTranspose1d/2d/3d`` along dim 1) and those added by :func:`register_norm_module`;
:func:`apply_norm` hands those rules to :func:`cdeq.apply_norm`, with TorchDEQ's settings read
from ``args`` (``norm_type``, ``norm_no_scale``, ``norm_target_norm``, ``norm_clip``,
``norm_clip_value``, ``sn_n_power_iters``) or keyword arguments. One difference: with a learnt
scale, a spectral norm starts from g = sigma(W) in cdeq (the function unchanged), from
g = ``target_norm`` in TorchDEQ.

Example:
    >>> import torch
    >>> layer = torch.nn.Linear(4, 4)
    >>> apply_norm(layer, "weight_norm", norm_clip=True, norm_clip_value=1.0)
    >>> reset_norm(layer)        # once per training step, as in TorchDEQ
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from torch import nn

from cdeq import norm as _norm
from cdeq.compat.torchdeq._args import Settings, warn_once
from cdeq.norm import remove_norm, reset_norm

__all__ = ["apply_norm", "reset_norm", "remove_norm", "register_norm", "register_norm_module"]

_KINDS = {"weight_norm": "weight", "spectral_norm": "spectral"}


def _defaults() -> dict:
    rules = {cls: ("weight", 0) for cls in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)}
    rules.update({cls: ("weight", 1) for cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)})
    return rules


_RULES: dict[str, dict] = {kind: _defaults() for kind in _KINDS}


def register_norm(norm_type: str, norm_class: Any) -> None:
    """TorchDEQ's hook for a new normalisation class, which cdeq does not take: an error."""
    raise NotImplementedError(
        f"register_norm({norm_type!r}, ...): cdeq's normalisations are 'weight_norm' and 'spectral_norm' "
        "(cdeq.norm); a custom class is not supported. Normalise the weight inside your module instead")


def register_norm_module(module_class: type, norm_type: str, names: Union[str, Sequence[str]] = "weight",
                         dims: Union[int, Sequence[int]] = 0) -> None:
    """Normalise the parameters ``names`` (along ``dims``) of every ``module_class`` when
    :func:`apply_norm` is called with ``norm_type``."""
    if norm_type not in _RULES:
        raise ValueError(f"register_norm_module: norm_type must be one of {sorted(_RULES)}, got {norm_type!r}")
    _RULES[norm_type][module_class] = (names, dims)


def _skipped(model: nn.Module, prefix_filter_out: Optional[Sequence[str]], filter_out: Optional[Sequence[str]]):
    """Names of the modules TorchDEQ skips: a name starting with a prefix, or containing a string."""
    prefixes = [prefix_filter_out] if isinstance(prefix_filter_out, str) else list(prefix_filter_out or [])
    parts = [filter_out] if isinstance(filter_out, str) else list(filter_out or [])
    return tuple(name for name, _ in model.named_modules()
                 if any(name.startswith(p) for p in prefixes) or any(p in name for p in parts))


def apply_norm(model: nn.Module, norm_type: str = "weight_norm", prefix_filter_out: Optional[Sequence[str]] = None,
               filter_out: Optional[Sequence[str]] = None, args: Any = None, **norm_kwargs: Any) -> None:
    """Normalise the weights of ``model`` as TorchDEQ's ``apply_norm`` does (``norm_type``
    "weight_norm", "spectral_norm" or "none"; settings from ``args`` and ``norm_kwargs``)."""
    s = Settings(args, norm_kwargs)
    norm_type = s.get("norm_type", norm_type)
    if norm_type == "none":
        return
    if norm_type not in _KINDS:
        raise ValueError(f"norm_type: expected one of {sorted(_KINDS) + ['none']}, got {norm_type!r}")
    rules = _RULES[norm_type]
    exclude = _skipped(model, prefix_filter_out, filter_out)
    if not any(type(m) in rules and not _norm._excluded(n, m, exclude) for n, m in model.named_modules()):
        known = ", ".join(c.__name__ for c in rules)
        warn_once(f"apply_norm.empty.{type(model).__name__}",
                  f"apply_norm: {type(model).__name__} has no module of a registered type ({known}) to normalise; "
                  "nothing was done (register_norm_module adds types)")
        return
    clip = s.get("norm_clip", s.get("clip", False))
    _norm.apply_norm(model, kind=_KINDS[norm_type], exclude=exclude, rules=rules,
                     clip=s.get("norm_clip_value", s.get("clip_value", 1.0)) if clip else None,
                     scale=not s.get("norm_no_scale", not s.get("learn_scale", True)),
                     target_norm=s.get("norm_target_norm", s.get("target_norm", 1.0)),
                     power_iters=s.get("sn_n_power_iters", s.get("n_power_iterations", 1)))
