"""States of a DEQ: a tensor or a tuple of tensors, batch on dimension 0.

Solvers work on one flat ``(B, N)`` tensor; :class:`StateLayout` records how a (tuple) state maps
to it and back, and validates that every state a solver sees keeps that layout, so that a shape or
dtype mismatch is an error naming the argument instead of a silent broadcast.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence, Union

import torch
from torch import Tensor

State = Union[Tensor, tuple[Tensor, ...]]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def as_tuple(z: State) -> tuple[Tensor, ...]:
    """The parts of a state as a tuple (a single tensor becomes a 1-tuple)."""
    return tuple(z) if isinstance(z, (tuple, list)) else (z,)


def batch_items(x: State) -> int:
    """The items in a batch: the first dimension of its (first) tensor, 1 for a 0-d one."""
    first = as_tuple(x)[0]
    return first.shape[0] if first.dim() else 1


def map_state(fn: Callable[..., Tensor], *states: State) -> State:
    """Apply ``fn`` part by part to states of the same structure, keeping that structure."""
    if isinstance(states[0], (tuple, list)):
        return tuple(fn(*parts) for parts in zip(*states))
    return fn(*states)


def to_device(x: Any, device: Union[str, torch.device]) -> Any:
    """An input or state (a tensor, a tuple of tensors, or None) moved to ``device``; anything else
    (e.g. a graph object) is returned as it is."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return tuple(to_device(p, device) for p in x)
    return x


class StateLayout:
    """The shapes, dtype and device of a batched state, and its flat ``(B, N)`` view.

    Example:
        >>> z = (torch.zeros(4, 3), torch.zeros(4, 2, 5))
        >>> layout = StateLayout(z)
        >>> flat = layout.flatten(z)        # shape (4, 13)
        >>> layout.unflatten(flat)[1].shape
        torch.Size([4, 2, 5])
    """

    def __init__(self, z: State, name: str = "z0") -> None:
        parts = as_tuple(z)
        self.name = name
        self.is_tuple = isinstance(z, (tuple, list))
        if len(parts) == 0:
            raise ValueError(f"{name}: expected a tensor or a non-empty tuple of tensors, got an empty tuple")
        for i, p in enumerate(parts):
            where = f"{name}[{i}]" if self.is_tuple else name
            if not isinstance(p, Tensor):
                raise TypeError(f"{where}: expected a torch.Tensor, got {type(p).__name__}")
            if p.dim() < 2:
                raise ValueError(
                    f"{where}: expected a batched state of shape (B, ...) with at least 2 dimensions, "
                    f"got shape {tuple(p.shape)}; add a batch dimension (e.g. z.unsqueeze(0))"
                )
            if p.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"{where}: expected a floating dtype {SUPPORTED_DTYPES}, got {p.dtype}")
        batch = parts[0].shape[0]
        for i, p in enumerate(parts):
            if p.shape[0] != batch:
                raise ValueError(
                    f"{name}[{i}]: batch size {p.shape[0]} differs from {name}[0]'s batch size {batch}"
                )
            if p.dtype != parts[0].dtype or p.device != parts[0].device:
                raise ValueError(
                    f"{name}[{i}]: dtype/device {p.dtype}/{p.device} differs from "
                    f"{name}[0]'s {parts[0].dtype}/{parts[0].device}"
                )
        self.batch_size: int = batch
        self.shapes: tuple[torch.Size, ...] = tuple(p.shape for p in parts)
        self.sizes: tuple[int, ...] = tuple(math.prod(s[1:]) for s in self.shapes)
        self.dim: int = sum(self.sizes)
        self.dtype: torch.dtype = parts[0].dtype
        self.device: torch.device = parts[0].device

    def check(self, z: State, name: str) -> None:
        """Raise a clear error unless ``z`` has exactly this layout (structure, shapes, dtype)."""
        parts = as_tuple(z)
        if isinstance(z, (tuple, list)) != self.is_tuple or len(parts) != len(self.shapes):
            raise ValueError(
                f"{name}: expected a state with the structure of {self.name} "
                f"({len(self.shapes)} part(s), tuple={self.is_tuple}), got "
                f"{len(parts)} part(s), tuple={isinstance(z, (tuple, list))}"
            )
        for i, (p, shape) in enumerate(zip(parts, self.shapes)):
            where = f"{name}[{i}]" if self.is_tuple else name
            if not isinstance(p, Tensor):
                raise TypeError(f"{where}: expected a torch.Tensor, got {type(p).__name__}")
            if p.shape != shape:
                raise ValueError(f"{where}: expected shape {tuple(shape)} (that of {self.name}), got {tuple(p.shape)}")
            if p.dtype != self.dtype:
                raise TypeError(f"{where}: expected dtype {self.dtype} (that of {self.name}), got {p.dtype}")

    def flatten(self, z: State) -> Tensor:
        """The state as one ``(B, N)`` tensor (a view for a single contiguous tensor)."""
        parts = as_tuple(z)
        if len(parts) == 1:
            return parts[0].reshape(self.batch_size, -1)
        return torch.cat([p.reshape(self.batch_size, -1) for p in parts], dim=1)

    def unflatten(self, flat: Tensor) -> State:
        """The inverse of :meth:`flatten`."""
        if not self.is_tuple:
            return flat.reshape(*self.shapes[0])  # ints: a torch.Size argument costs twice as long to parse
        chunks = torch.split(flat, list(self.sizes), dim=1)
        return tuple(c.reshape(*s) for c, s in zip(chunks, self.shapes))

    def zeros(self) -> State:
        """A zero state of this layout."""
        return self.unflatten(torch.zeros(self.batch_size, self.dim, dtype=self.dtype, device=self.device))


def batch_norm2(z: Sequence[Tensor] | Tensor) -> Tensor:
    """Per-sample Euclidean norm of a (tuple) state, shape ``(B,)``, accumulated in float32 or wider."""
    total = None
    for p in as_tuple(z):
        q = p.reshape(p.shape[0], -1)
        q = q.float() if q.dtype in (torch.bfloat16, torch.float16) else q
        s = (q * q).sum(dim=1)
        total = s if total is None else total + s
    return total.sqrt()
