"""TorchDEQ's variational dropouts on :class:`cdeq.dropout.VariationalDropout` (one mask per
training step, drawn at the first call after :func:`reset_dropout`).

The classes take TorchDEQ's ``dropout`` (probability) and ``token_first``; each shares its mask
along the dimensions TorchDEQ's does: ``VariationalDropout`` none, ``VariationalDropout1d/2d/3d``
the token (spatial) dimensions, ``VariationalDropToken1d/2d/3d`` the feature dimension.

Example:
    >>> drop = VariationalDropout2d(0.3, token_first=False)     # (B, C, H, W): whole channels
    >>> drop.shared_dims
    (2, 3)
"""
from __future__ import annotations

from cdeq.dropout import VariationalDropout as _Base
from cdeq.dropout import reset_dropout

__all__ = ["VariationalDropout", "VariationalDropout1d", "VariationalDropout2d", "VariationalDropout3d",
           "VariationalDropToken1d", "VariationalDropToken2d", "VariationalDropToken3d", "reset_dropout"]


class VariationalDropout(_Base):
    """An independent draw per entry, fixed until :func:`reset_dropout`."""

    def __init__(self, dropout: float = 0.5) -> None:
        super().__init__(dropout)
        self.dropout = dropout


def _tokens(n: int, token_first: bool) -> tuple[int, ...]:
    """The n token dimensions of a ``(B, tokens..., D)`` or ``(B, D, tokens...)`` input."""
    return tuple(range(1, n + 1)) if token_first else tuple(range(2, n + 2))


def _features(n: int, token_first: bool) -> tuple[int, ...]:
    return (n + 1,) if token_first else (1,)


def _dropout_class(name: str, n: int, drop_tokens: bool) -> type:
    shared = _features if drop_tokens else _tokens
    what = "whole tokens (a draw per token)" if drop_tokens else "whole features (a draw per feature)"

    def __init__(self, dropout: float = 0.5, token_first: bool = True) -> None:
        _Base.__init__(self, dropout, shared(n, token_first))
        self.dropout, self.token_first = dropout, token_first

    doc = (f"Drops {what} of an input with {n} token dimensions: ``(B, *tokens, D)`` when ``token_first``, "
           "else ``(B, D, *tokens)``.")
    return type(name, (_Base,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


VariationalDropout1d = _dropout_class("VariationalDropout1d", 1, False)
VariationalDropout2d = _dropout_class("VariationalDropout2d", 2, False)
VariationalDropout3d = _dropout_class("VariationalDropout3d", 3, False)
VariationalDropToken1d = _dropout_class("VariationalDropToken1d", 1, True)
VariationalDropToken2d = _dropout_class("VariationalDropToken2d", 2, True)
VariationalDropToken3d = _dropout_class("VariationalDropToken3d", 3, True)
