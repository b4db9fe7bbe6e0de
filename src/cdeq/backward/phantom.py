"""Phantom gradients (torchdeq paper Eq. 4-6): k damped steps z <- tau f(z) + (1 - tau) z taken
with autograd on, from a solver's (detached) state."""
from __future__ import annotations

from typing import Callable

import torch

from cdeq.state import State, map_state


def phantom_steps(f: Callable[[State], State], z: State, steps: int, tau: float) -> State:
    """Apply ``steps`` damped steps of Eq. 5 to ``z``; backpropagating through them gives the
    phantom gradient of Eq. 6 (with ``tau=1`` and ``z = z0`` it is plain BPTT).

    Example:
        >>> phantom_steps(lambda z: 0.5 * z + 1, torch.zeros(1, 2), steps=2, tau=1.0)
        tensor([[1.5000, 1.5000]])
    """
    for _ in range(steps):
        fz = f(z)
        z = fz if tau == 1.0 else map_state(lambda a, b: torch.lerp(a, b, tau), z, fz)
    return z


def straight_through(value: State, surrogate: State) -> State:
    """A state equal to ``value`` whose gradient is that of ``surrogate``."""
    return map_state(lambda v, s: v + (s - s.detach()), value, surrogate)
