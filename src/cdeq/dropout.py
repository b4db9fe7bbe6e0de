"""Variational dropout for DEQ layers: one mask per forward of the DEQ (torchdeq paper Sec. 2.6).

A DEQ calls its layer tens of times per forward; an ordinary dropout would draw a new mask at
every call, so f would change from one solver step to the next and have no fixed point. A
:class:`VariationalDropout` draws its mask at the first call after :func:`reset_dropout` and
reuses it until the next reset (call that once per training step, like :func:`cdeq.reset_norm`).

Example:
    >>> drop = VariationalDropout(0.5, shared_dims=(2, 3))   # one draw per (sample, channel) of a map
    >>> x = torch.ones(2, 4, 3, 3)
    >>> torch.equal(drop(x), drop(2 * x) / 2)               # the same mask at every call
    True
    >>> reset_dropout(drop)                                  # a new mask at the next call
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn


class VariationalDropout(nn.Module):
    """Zero each entry with probability ``p`` and scale the rest by 1 / (1 - p), with a mask that
    stays fixed until :func:`reset_dropout`.

    Args:
        p: the drop probability, in [0, 1).
        shared_dims: dimensions of the input (not 0, the batch) along which one mask entry is
            shared, e.g. ``(2, 3)`` drops whole channels of a ``(B, C, H, W)`` map, ``(2,)`` whole
            tokens of a ``(B, L, D)`` sequence. Empty: an independent draw per entry.
    """

    def __init__(self, p: float = 0.5, shared_dims: Sequence[int] = ()) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(f"p: expected a drop probability in [0, 1), got {p!r}")
        dims = tuple(shared_dims)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims):
            raise ValueError(f"shared_dims: expected dimensions >= 1 (0 is the batch), got {shared_dims!r}")
        self.p, self.shared_dims = float(p), dims
        self.mask: Optional[Tensor] = None

    def extra_repr(self) -> str:
        return f"p={self.p}, shared_dims={self.shared_dims}"

    def reset(self) -> None:
        """Forget the mask; the next call draws a new one."""
        self.mask = None

    def _mask_shape(self, x: Tensor) -> list[int]:
        if any(d >= x.dim() for d in self.shared_dims):
            raise ValueError(f"VariationalDropout: shared_dims {self.shared_dims} do not fit an input of shape "
                             f"{tuple(x.shape)}")
        return [1 if d in self.shared_dims else n for d, n in enumerate(x.shape)]

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        shape = self._mask_shape(x)
        if self.mask is None:
            keep = torch.full(shape, 1 - self.p, dtype=x.dtype, device=x.device)
            self.mask = torch.bernoulli(keep) / (1 - self.p)
        elif list(self.mask.shape) != shape:
            raise ValueError(f"VariationalDropout: the mask was drawn for an input of mask shape "
                             f"{tuple(self.mask.shape)}, this input needs {tuple(shape)}; call reset_dropout(model) "
                             "at the start of each forward of the DEQ")
        return x * self.mask


def reset_dropout(module: nn.Module) -> None:
    """Forget the mask of every :class:`VariationalDropout` in ``module`` (once per training step)."""
    for sub in module.modules():
        if isinstance(sub, VariationalDropout):
            sub.reset()
