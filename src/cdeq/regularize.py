"""Regularisers and initialisation that shape the equilibrium landscape (torchdeq paper Sec. 2.6).

- :func:`jacobian_penalty`: Hutchinson estimate of ||J||_F^2 (Eq. 17-18), a trainable loss term.
- :func:`spectral_radius`: the power method on J, a per-sample stability diagnostic
  (:func:`jacobian_power_method` on a graph already built).
- :func:`fixed_point_correction`: decayed task losses on intermediate states (Eq. 19).
- :func:`mixed_init`: half zeros, half Gaussian initial states.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from cdeq.backward.implicit import vjp_function
from cdeq.solvers.base import vector_norm
from cdeq.state import State, StateLayout, as_tuple, map_state


def _check_graph(fz: State, z: State, where: str) -> None:
    if not all(p.requires_grad for p in as_tuple(z)) or not all(p.requires_grad for p in as_tuple(fz)):
        raise ValueError(
            f"{where}: z must require grad and fz = f(z) must be computed from it with grad enabled, "
            "e.g. z = z.detach().requires_grad_(); fz = f(z)"
        )


def jacobian_penalty(fz: State, z: State, samples: int = 1) -> Tensor:
    """Hutchinson estimate of ||J||_F^2 / dim, J = d fz / d z, averaged over the batch (Eq. 17-18).

    With eps ~ N(0, I), E ||eps^T J||^2 = tr(J J^T) = ||J||_F^2, an upper bound of the spectral
    radius squared (Eq. 17); dividing by the state dimension makes the weight independent of size.
    The estimate is built with ``create_graph=True`` so adding it to the loss trains f to be more
    contractive; ``fz``'s graph is kept for the task loss.

    Args:
        fz: f(z), computed from ``z`` with grad enabled (tensor or tuple state, batch first).
        z: the state it was computed from (requires grad).
        samples: number of Gaussian probes per sample.

    Example:
        >>> z = torch.randn(8, 3, requires_grad=True)
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 0.0]))
        >>> penalty = jacobian_penalty(z @ A.T, z, samples=500)  # about ||A||_F^2 / 3 = 5/3
        >>> abs(penalty.item() - 5 / 3) < 0.2
        True
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples: expected an integer >= 1, got {samples!r}")
    _check_graph(fz, z, "jacobian_penalty")
    layout = StateLayout(z, "z")
    layout.check(fz, "fz")
    vjp = vjp_function(fz, z, layout, create_graph=True)
    total = sum(vjp(torch.randn_like(layout.flatten(fz))).pow(2).sum() for _ in range(samples))
    return total / (samples * layout.batch_size * layout.dim)


def spectral_radius(f: Callable[[State], State], z: State, iters: int = 50,
                    generator: Optional[torch.Generator] = None) -> Tensor:
    """Per-sample estimate of the spectral radius of J = df/dz at ``z`` by the power method.

    Iterates v <- v J / ||v J|| with vector-Jacobian products (J and J^T share their eigenvalues)
    on one graph of f(z) and returns ||v J|| for unit v, shape (B,), without gradients. It
    converges when one eigenvalue dominates in modulus; a value >= 1 flags an unstable fixed point.

    Example:
        >>> A = torch.tensor([[0.5, 1.0], [0.0, -0.9]])
        >>> spectral_radius(lambda z: z @ A.T, torch.zeros(3, 2), iters=100)
        tensor([0.9000, 0.9000, 0.9000])
    """
    z_in = map_state(lambda t: t.detach().requires_grad_(), z)
    with torch.enable_grad():
        fz = f(z_in)
    return jacobian_power_method(fz, z_in, iters, generator)[0]


def jacobian_power_method(fz: State, z: State, iters: int = 50,
                          generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """The power method of :func:`spectral_radius` on a graph ``fz = f(z)`` already built (``z``
    requiring grad): returns the (B,) radius estimates and the flat ``(B, N)`` unit vectors v
    with ||v J|| = radius."""
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters: expected an integer >= 1, got {iters!r}")
    _check_graph(fz, z, "jacobian_power_method")
    layout = StateLayout(z, "z")
    layout.check(fz, "f(z)")
    vjp = vjp_function(fz, z, layout)
    v = torch.randn(layout.batch_size, layout.dim, dtype=layout.dtype, device=layout.device, generator=generator)
    v = v / vector_norm(v).unsqueeze(1)
    for _ in range(iters):
        w = vjp(v)
        radius = vector_norm(w)
        v = w / radius.clamp_min(torch.finfo(radius.dtype).tiny).unsqueeze(1)
    return radius.detach(), v.detach()


def fixed_point_correction(states: Sequence[State], loss_fn: Callable[[State], Tensor], gamma: float = 0.8) -> Tensor:
    """Fixed-point correction loss sum_i gamma^(n-i) L(y(z_i)), i = 1..n (Eq. 19).

    Args:
        states: z_1..z_n in solve order, e.g. ``info.states`` of ``deq(f, z0, return_steps=[...])``
            (differentiable); the last one gets weight 1, earlier ones decay by ``gamma``.
        loss_fn: state -> scalar task loss, e.g. ``lambda z: F.cross_entropy(model.readout(z), y)``.
        gamma: decay in (0, 1].

    Example:
        >>> states = [torch.full((1, 1), 1.0), torch.full((1, 1), 2.0)]
        >>> fixed_point_correction(states, lambda z: z.sum(), gamma=0.5)  # 0.5 * 1 + 2
        tensor(2.5000)
    """
    if isinstance(states, (Tensor, str)) or not isinstance(states, Sequence) or len(states) == 0:
        raise ValueError("states: expected a non-empty list of states (e.g. info.states from return_steps)")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
        raise ValueError(f"gamma: expected a decay in (0, 1], got {gamma!r}")
    n = len(states)
    total = None
    for i, state in enumerate(states):
        loss = loss_fn(state)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError(f"loss_fn: expected a scalar tensor loss, got {type(loss).__name__} "
                             f"of shape {tuple(getattr(loss, 'shape', ()))}")
        term = gamma ** (n - 1 - i) * loss
        total = term if total is None else total + term
    return total


ShapeOrLike = Union[Sequence[int], torch.Size, State]


def mixed_init(shape_or_like: ShapeOrLike, *, dtype: Optional[torch.dtype] = None,
               device: Optional[Union[str, torch.device]] = None,
               generator: Optional[torch.Generator] = None) -> State:
    """Mixed initialisation: in every sample, half of the entries (rounded down) are zero and the
    rest standard Gaussian, at random places (torchdeq paper Sec. 2.6).

    Args:
        shape_or_like: a batched shape ``(B, ...)``, or a state (tensor or tuple of tensors) whose
            shapes, dtype and device to copy.
        dtype, device: override those of ``shape_or_like`` (defaults: torch's).
        generator: for reproducible draws.

    Example:
        >>> z0 = mixed_init((4, 10))
        >>> (z0 == 0).sum(dim=1)
        tensor([5, 5, 5, 5])
    """
    if isinstance(shape_or_like, (tuple, list)) and shape_or_like and all(isinstance(p, Tensor) for p in shape_or_like):
        return tuple(mixed_init(p, dtype=dtype, device=device, generator=generator) for p in shape_or_like)
    if isinstance(shape_or_like, Tensor):
        like = shape_or_like
        shape, dtype, device = like.shape, dtype or like.dtype, device or like.device
    else:
        shape = shape_or_like
        ok = isinstance(shape, (tuple, list, torch.Size)) and all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
        if not ok:
            raise ValueError(f"shape_or_like: expected a shape (B, ...), a tensor or a tuple of tensors, got {shape!r}")
    if len(shape) < 2:
        raise ValueError(f"shape_or_like: expected a batched shape (B, ...) of at least 2 dimensions, got {tuple(shape)}")
    batch, per_sample = shape[0], math.prod(shape[1:])
    noise = torch.randn(batch, per_sample, dtype=dtype, device=device, generator=generator)
    order = torch.rand(batch, per_sample, device=noise.device, generator=generator).argsort(dim=1)
    noise.scatter_(1, order[:, : per_sample // 2], 0.0)
    return noise.reshape(shape)
