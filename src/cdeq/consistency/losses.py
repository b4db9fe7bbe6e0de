"""Distances and task loss of consistency distillation (Eq. 9-11, 14).

Distances are per-element means over every part of a (tuple) state, so their scale does not
depend on the state's size.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from cdeq.state import State, as_tuple

DISTANCES = ("mse", "huber")
TaskLoss = Callable[[Tensor, Tensor], Tensor]


def mean_square(z: State) -> Tensor:
    """The mean of z^2 over every element of every part (a detached scalar)."""
    total = sum(float((p.detach().float() ** 2).sum()) for p in as_tuple(z))
    return torch.tensor(total / sum(p.numel() for p in as_tuple(z)))


def state_distance(a: State, b: State, kind: str = "mse", delta: float = 0.1, scale: float | Tensor = 1.0) -> Tensor:
    """d(a, b) of Eq. 9-10: ``"mse"`` or ``"huber"`` (quadratic below ``delta``, linear above),
    averaged over all elements of all parts and divided by ``scale``."""
    if kind not in DISTANCES:
        raise ValueError(f"distance: expected one of {DISTANCES}, got {kind!r}")
    total, count = 0.0, 0
    for p, q in zip(as_tuple(a), as_tuple(b)):
        if p.shape != q.shape:
            raise ValueError(f"states of the wrong shape: {tuple(p.shape)} vs {tuple(q.shape)}")
        if kind == "mse":
            total = total + F.mse_loss(p, q, reduction="sum")
        else:
            total = total + F.huber_loss(p, q, reduction="sum", delta=delta)
        count += p.numel()
    return total / (count * scale)


def relative_error(z: State, z_star: State) -> Tensor:
    """Per-sample ||z - z*|| / ||z*||, ``(B,)``: the error to the equilibrium used in reports."""
    num = torch.zeros(as_tuple(z)[0].shape[0], dtype=torch.float64, device=as_tuple(z)[0].device)
    den = torch.zeros_like(num)
    for p, q in zip(as_tuple(z), as_tuple(z_star)):
        d = (p.double() - q.double()).reshape(p.shape[0], -1)
        num += (d * d).sum(dim=1)
        den += (q.double().reshape(q.shape[0], -1) ** 2).sum(dim=1)
    return (num / den.clamp_min(1e-300)).sqrt()


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy over the last dimension of ``logits``; labels -100 are ignored (Eq. 14)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1).long(), ignore_index=-100)
