"""Virtual time of a C-DEQ: the boundary coefficients (Eq. 5), the training time map from the
teacher's solver step k (Eq. 6) and the inference schedule (Appendix B.3).

Times live in ``[eps, T]``. ``t_0 = eps`` is the start of every trajectory (the fixed z_0) and
``c_skip(T) = 1`` makes ``g(z, T) = z``, the boundary condition of a consistency function.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

TimeLike = Union[float, Tensor]


@dataclass(frozen=True)
class TimeSchedule:
    """The time hyper-parameters of a C-DEQ.

    Args:
        eps: the first time, t_0 (Eq. 6 at k = 0).
        T: the terminal time, where ``c_skip = 1``.
        gamma: exponent of ``c_skip`` (Eq. 5), ``>= 1``.
        rho: compression rate of the training time map (Eq. 6), ``> 0``.
        beta: ratio of the inference schedule ``t_j = eps + (1 - beta^j)(T - eps)`` (B.3), in
            ``(0, 1)``. ``None`` aligns it with training, ``beta = e^{-rho}``, so that inference
            step j is evaluated at exactly the time the teacher's state k = j was trained at.
    """

    eps: float = 0.01
    T: float = 1.0
    gamma: float = 1.0
    rho: float = 0.25
    beta: Optional[float] = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.eps) and math.isfinite(self.T)) or not self.eps < self.T:
            raise ValueError(f"eps, T: expected finite eps < T, got eps={self.eps}, T={self.T}")
        if not self.gamma >= 1:
            raise ValueError(f"gamma: expected gamma >= 1 (Eq. 5), got {self.gamma}")
        if not self.rho > 0:
            raise ValueError(f"rho: expected rho > 0 (Eq. 6), got {self.rho}")
        if self.beta is not None and not 0 < self.beta < 1:
            raise ValueError(f"beta: expected 0 < beta < 1 (Appendix B.3), got {self.beta}")

    @property
    def inference_beta(self) -> float:
        """The inference ratio actually used: ``beta``, or ``e^{-rho}`` when aligned."""
        return math.exp(-self.rho) if self.beta is None else self.beta

    def check(self, t: TimeLike, name: str = "t") -> None:
        """Raise unless every time in ``t`` lies in ``[eps, T]`` (a small float tolerance allowed)."""
        tt = torch.as_tensor(t, dtype=torch.float64)
        tol = 1e-6 * (self.T - self.eps)
        if tt.numel() and (tt.min() < self.eps - tol or tt.max() > self.T + tol or tt.isnan().any()):
            raise ValueError(
                f"{name}: times must lie in [eps, T] = [{self.eps}, {self.T}], got range "
                f"[{tt.min().item()}, {tt.max().item()}]"
            )

    def c_skip(self, t: TimeLike) -> TimeLike:
        """``((t - eps) / (T - eps))^gamma`` (Eq. 5)."""
        self.check(t)
        ratio = (t - self.eps) / (self.T - self.eps)
        if isinstance(ratio, Tensor):
            return ratio.clamp(0.0, 1.0) ** self.gamma
        return min(max(ratio, 0.0), 1.0) ** self.gamma

    def c_out(self, t: TimeLike) -> TimeLike:
        """``1 - c_skip(t)`` (Eq. 5)."""
        return 1 - self.c_skip(t)

    def train_time(self, k: Union[int, Tensor]) -> TimeLike:
        """Time of the teacher's state after k solver steps: ``eps + (1 - e^{-rho k})(T - eps)`` (Eq. 6)."""
        if isinstance(k, Tensor):
            if k.numel() and int(k.min()) < 0:
                raise ValueError(f"k: solver steps must be >= 0, got min {int(k.min())}")
            return self.eps + (1 - torch.exp(-self.rho * k.double())).float() * (self.T - self.eps)
        if k < 0:
            raise ValueError(f"k: solver steps must be >= 0, got {k}")
        return self.eps + (1 - math.exp(-self.rho * k)) * (self.T - self.eps)

    def inference_times(self, nfe: int, schedule: Optional[Sequence[float]] = None) -> list[float]:
        """The J times t_0..t_{J-1} at which Algorithm 1 evaluates g.

        Default: ``t_j = eps + (1 - beta^j)(T - eps)`` (Appendix B.3; ``t_0 = eps``). A given
        ``schedule`` must hold J times in ``[eps, T]``, non-decreasing.
        """
        if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1:
            raise ValueError(f"nfe: expected an int >= 1 (network evaluations), got {nfe!r}")
        if schedule is None:
            b = self.inference_beta
            return [self.eps + (1 - b**j) * (self.T - self.eps) for j in range(nfe)]
        times = [float(t) for t in schedule]
        if len(times) != nfe:
            raise ValueError(f"schedule: expected {nfe} times (one per step), got {len(times)}")
        self.check(torch.tensor(times), "schedule")
        if any(b < a for a, b in zip(times, times[1:])):
            raise ValueError(f"schedule: times must be non-decreasing, got {times}")
        return times
