"""A learned initial state z_0 = init_state(u) + net(u): a 1x1 network of the injection per state part.

A DEQ starts its solver from a fixed z_0 (zeros). For layers whose first call from zeros sees the
input only pointwise (an MDEQ branch computes GN(ReLU(GN(u + c))) when z = 0; IGNN computes
ReLU(u)), a z_0 that already depends on u lets the first call of f do its full spatial or graph
mixing. HyperDEQ learns such an initialiser (a two-layer MLP); the C-DEQ student may learn one
too (``ConsistencyDEQ(init="linear" | "mlp")``). Both cost no call of f and start at zero output,
that is at the teacher's own z_0.

Each state part i is fed by injection part i (or the injection's only part); 4-D maps at another
resolution are average-pooled to the part's size. The nets act along ``feature_dim`` at every
position; their last layer is zero-initialised.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdeq.state import State, as_tuple


def pointwise_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], dim: int) -> Tensor:
    """``weight @ x + bias`` along ``dim`` at every position; ``bias`` is ``(C_out,)`` or per sample
    ``(B, C_out)``. Channels-first maps (``(B, C, ...)``, ``dim`` 1) take one ``baddbmm`` over the
    flattened positions, which keeps their memory layout (faster on CPU than a 1x1 ``conv2d``;
    ``movedim`` + ``linear`` copies twice)."""
    dim = dim % x.dim()
    if dim == 1 and x.dim() > 2:
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        w = weight.expand(x.shape[0], *weight.shape)
        out = torch.bmm(w, flat) if bias is None else torch.baddbmm(bias.unsqueeze(-1), w, flat)
        return out.reshape(x.shape[0], weight.shape[0], *x.shape[2:])
    if bias is None or bias.dim() == 1:
        return F.linear(x.movedim(dim, -1), weight, bias).movedim(-1, dim)
    shape = [1] * x.dim()
    shape[0], shape[dim] = bias.shape[0], weight.shape[0]
    return F.linear(x.movedim(dim, -1), weight).movedim(-1, dim) + bias.reshape(shape)


class PointwiseNet(nn.Module):
    """A linear map (``hidden`` 0) or a two-layer GELU MLP along ``dim``, at every position."""

    def __init__(self, c_in: int, hidden: int, c_out: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.inp = nn.Linear(c_in, hidden) if hidden > 0 else None
        self.out = nn.Linear(hidden if hidden > 0 else c_in, c_out)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.inp is not None:
            x = F.gelu(pointwise_linear(x, self.inp.weight, self.inp.bias, self.dim))
        return pointwise_linear(x, self.out.weight, self.out.bias, self.dim)


class StateInitialiser(nn.ModuleList):
    """One :class:`PointwiseNet` per state part; ``self(u, z) = z + net(u)`` part by part.

    Built from example shapes with :meth:`build` (or from a saved state dict with
    :meth:`build_from_state_dict`); ``hidden`` 0 gives linear maps.
    """

    def __init__(self, feature_dim: int, hidden: int) -> None:
        super().__init__()
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
            raise ValueError(f"hidden: expected an int >= 0 (0 = linear), got {hidden!r}")
        self.feature_dim, self.hidden = feature_dim, hidden

    @property
    def built(self) -> bool:
        return len(self) > 0

    def sources(self, u: Any, z: State) -> list[Tensor]:
        """The injection tensor that feeds each state part (part i <- u part i, or u's only part)."""
        u_parts, z_parts = as_tuple(u), as_tuple(z)
        if not all(isinstance(p, Tensor) for p in u_parts):
            raise TypeError("inject(x): a learned initial state needs a tensor or tuple of tensors")
        if len(u_parts) not in (1, len(z_parts)):
            raise ValueError(f"inject(x) gives {len(u_parts)} tensors for a state of {len(z_parts)} parts; "
                             "a learned initial state needs one, or one per state part")
        return [u_parts[i] if len(u_parts) > 1 else u_parts[0] for i in range(len(z_parts))]

    def align(self, src: Tensor, like: Tensor) -> Tensor:
        """``src`` at the positions of ``like`` (4-D maps are average-pooled to like's size)."""
        fd = self.feature_dim % like.dim()
        pos = [d for d in range(1, like.dim()) if d != fd]
        if src.dim() == like.dim() and all(src.shape[d] == like.shape[d] for d in pos):
            return src
        if src.dim() == like.dim() == 4 and fd == 1:
            return F.adaptive_avg_pool2d(src, like.shape[2:])
        raise ValueError(f"inject(x) part of shape {tuple(src.shape)} cannot be aligned with a state part "
                         f"of shape {tuple(like.shape)} (feature_dim={self.feature_dim})")

    def build(self, u: Any, z: State) -> None:
        """Create the nets for injection ``u`` and initial state ``z`` (no-op once built)."""
        if self.built:
            return
        for src, part in zip(self.sources(u, z), as_tuple(z)):
            src = self.align(src, part)
            net = PointwiseNet(src.shape[self.feature_dim], self.hidden, part.shape[self.feature_dim], self.feature_dim)
            self.append(net.to(device=part.device, dtype=part.dtype))

    def build_from_state_dict(self, state_dict: Any, prefix: str, like: Tensor) -> None:
        """Create the nets from the shapes saved under ``prefix`` (e.g. ``"init_nets."``), on the
        device and dtype of ``like`` (a parameter of the owning model)."""
        if self.built:
            return
        i = 0
        while f"{prefix}{i}.out.weight" in state_dict:
            w_out = state_dict[f"{prefix}{i}.out.weight"]
            w_in: Optional[Tensor] = state_dict.get(f"{prefix}{i}.inp.weight")
            c_in, hidden = (w_in.shape[1], w_in.shape[0]) if w_in is not None else (w_out.shape[1], 0)
            net = PointwiseNet(c_in, hidden, w_out.shape[0], self.feature_dim)
            self.append(net.to(device=like.device, dtype=like.dtype))
            i += 1

    def forward(self, u: Any, z: State) -> State:  # type: ignore[override]
        """z_0 = z + net(u), part by part (zero NFE)."""
        if not self.built:
            raise RuntimeError("StateInitialiser: not built; call build(u, z) first")
        parts = [p + net(self.align(src, p)) for p, net, src in zip(as_tuple(z), self, self.sources(u, z))]
        return tuple(parts) if isinstance(z, (tuple, list)) else parts[0]
