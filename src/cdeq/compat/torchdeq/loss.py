"""TorchDEQ's ``torchdeq.loss``: fixed-point correction (Eq. 19) and the Jacobian terms (Eq. 17-18),
on :mod:`cdeq.regularize`.

Example:
    >>> states = [torch.full((1,), 1.0), torch.full((1,), 2.0)]
    >>> fp_correction(lambda z, y: (z - y).abs().sum(), (states, torch.zeros(1)), gamma=0.5)
    tensor(2.5000)
"""
from __future__ import annotations

from typing import Any, Callable, Sequence, Union

from torch import Tensor

from cdeq.regularize import fixed_point_correction, jacobian_penalty, jacobian_power_method

__all__ = ["fp_correction", "register_weight_func", "jac_reg", "power_method"]


def _linear(n: int, k: int, gamma: float = 0.9, bias: float = 0.0, **_: Any) -> float:
    return 1 - (n - k - 1) / n * gamma + bias


def _const(n: int, k: int, c: float = 1.0, **_: Any) -> float:
    return c


_WEIGHTS: dict[str, Callable[..., float]] = {"linear": _linear, "const": _const}  # "exp" is cdeq's Eq. 19


def register_weight_func(name: str, func: Callable[..., float]) -> None:
    """Add a weight function ``func(n, k, **kwargs) -> float`` for :func:`fp_correction`."""
    if not callable(func):
        raise TypeError(f"register_weight_func: func must be callable, got {func!r}")
    _WEIGHTS[name] = func


def fp_correction(crit: Callable[..., Tensor], args: Sequence[Any], weight_func: str = "exp",
                  return_loss_values: bool = False, **kwargs: Any) -> Union[Tensor, tuple[Tensor, list[float]]]:
    """sum_k w(n, k) crit(args[0][k], args[1][k], ...), each argument a list of n entries or one
    value used for every k; ``weight_func`` "exp" (gamma^(n-k-1), Eq. 19, ``gamma`` 0.8), "linear",
    "const" or a registered one."""
    columns = [list(a) if isinstance(a, (list, tuple)) else [a] for a in args]
    n = max(len(c) for c in columns)
    values: list[float] = []

    def loss_at(k: int) -> Tensor:
        loss = crit(*(c[k % len(c)] for c in columns))
        if return_loss_values:
            values.append(loss.item())
        return loss

    if weight_func == "exp":
        total = fixed_point_correction(list(range(n)), loss_at, gamma=kwargs.get("gamma", 0.8))
    elif weight_func in _WEIGHTS:
        total = sum(_WEIGHTS[weight_func](n, k, **kwargs) * loss_at(k) for k in range(n))
    else:
        raise ValueError(f"weight_func: expected 'exp' or one of {sorted(_WEIGHTS)}, got {weight_func!r}")
    return (total, values) if return_loss_values else total


def jac_reg(f0: Tensor, z0: Tensor, vecs: int = 1, create_graph: bool = True) -> Tensor:
    """Hutchinson estimate of ||J||_F^2 / numel(z0) (Eq. 17-18) for the graph ``f0 = f(z0)``;
    ``create_graph=False`` returns it detached (for monitoring)."""
    penalty = jacobian_penalty(f0, z0, samples=vecs)
    return penalty if create_graph else penalty.detach()


def power_method(f0: Tensor, z0: Tensor, n_iters: int = 100) -> tuple[Tensor, Tensor]:
    """(eigenvector shaped like ``z0``, (B,) spectral radius) of J = df0/dz0 by the power method."""
    radius, vector = jacobian_power_method(f0, z0, n_iters)
    return vector.reshape(z0.shape), radius
