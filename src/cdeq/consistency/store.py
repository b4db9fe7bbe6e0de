"""Trajectory storage strategies for consistency distillation (Section 3.2, Algorithm 2): sizes and
the teacher in the loop.

Three strategies serve the states z_k, z_{k-1}, z_{k-2} and z_K (z* of Eq. 9) a distillation step
reads. ``full`` stores every state z_0..z_K of every item, ``subset`` stores z_0, z_K and ``keep``
further steps per item (:func:`~cdeq.consistency.trajectories.sample_trajectories`), and ``online``
stores no trajectory: :class:`OnlineTeacher` runs the frozen teacher's solver for the batch at hand,
beside an optional ``target`` store of the inputs and z_K alone (what HyperDEQ and the losses'
z* read).
:func:`store_bytes` and :func:`storage_table` say what each strategy takes on disk, so the choice
can be made before sampling; docs/storage.md has the table at the paper's scales.
"""
from __future__ import annotations

import copy
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from cdeq.precision import amp_layers, check_amp
from cdeq.state import State, as_tuple, map_state

STORES = ("full", "subset", "online")
# What a written cache can hold: a strategy's states, or z_K alone beside the online teacher.
CACHE_KINDS = ("full", "subset", "target")
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
# Bytes on disk beyond store_bytes: each shard's safetensors header (names, shapes, offsets and
# the layout metadata, ~100 B per tensor) and its entry in the manifest (three hex digests and a
# size), plus the manifest's settings. Measured at 1.2 kB per shard and 0.8 kB of manifest for the
# toy caches of tests/test_store.py; the bounds leave room for longer option values.
SHARD_OVERHEAD_BYTES = 2048
MANIFEST_OVERHEAD_BYTES = 4096


def _elements(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"state_shape: expected positive ints per dimension, got {tuple(shape)}")
        n *= d
    return n


def _state_elements(state_shape: Sequence[int] | Sequence[Sequence[int]]) -> int:
    """Elements of one item's state: a shape, or a list of shapes for a tuple state (no batch dim)."""
    if len(state_shape) and all(isinstance(s, (tuple, list)) for s in state_shape):
        return sum(_elements(s) for s in state_shape)
    return _elements(state_shape)


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of a storage dtype given by name ("float16") or as a torch dtype."""
    name = str(dtype).replace("torch.", "") if dtype is not None else None
    if name not in DTYPE_BYTES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPE_BYTES)} (or the torch dtype), got {dtype!r}")
    return DTYPE_BYTES[name]


def kept_states(store: str, steps: int, keep: Optional[int]) -> int:
    """States stored per item: K + 1 (full), keep + 2 (subset: z_0, z_K and keep more), 1 (target:
    z_K alone), 0 (online)."""
    known = (*STORES, "target")
    if store not in known:
        raise ValueError(f"store: expected one of {known}, got {store!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1 (teacher solver steps K), got {steps!r}")
    if store == "subset":
        if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= steps - 1:
            raise ValueError(f"keep: expected an int in [0, K - 1 = {steps - 1}] (steps kept besides z_0 and "
                             f"z_K) for store='subset', got {keep!r}")
        return keep + 2
    if keep is not None:
        raise ValueError(f"keep: only store='subset' keeps a number of steps; got keep={keep!r} with store={store!r}")
    return {"full": steps + 1, "target": 1, "online": 0}[store]


def store_bytes(state_shape: Sequence[int] | Sequence[Sequence[int]], steps: int, items: int,
                store: str = "full", keep: Optional[int] = None, dtype: Any = "float16", *,
                input_bytes: int = 0) -> int:
    """Bytes a trajectory store takes: items x (kept states x state bytes + per-item extras).

    The extras of a written store are the teacher's residual of every step (K + 1 float32), the
    Eq. 13 mask (K + 1 bools), the kept step indices (one int64 per kept state; subset, target) and
    ``input_bytes`` (x and y of one item). ``online`` stores nothing; beside it, ``target`` stores z_K
    alone. The files add at most ``SHARD_OVERHEAD_BYTES`` per shard and ``MANIFEST_OVERHEAD_BYTES``
    (headers, manifest).
    """
    n_states = kept_states(store, steps, keep)
    if isinstance(items, bool) or not isinstance(items, int) or items < 0:
        raise ValueError(f"items: expected an int >= 0, got {items!r}")
    state = _state_elements(state_shape) * dtype_bytes(dtype)
    if store == "online":
        return 0
    extras = (steps + 1) * 5 + (8 * n_states if store != "full" else 0) + int(input_bytes)
    return items * (n_states * state + extras)


def human_bytes(n: float) -> str:
    """Decimal units (kB = 1000 B), as disks are sold."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def storage_table(state_shapes: Sequence[int] | Sequence[Sequence[int]], steps: int, items: int,
                  dtype: Any = "float16", keeps: Sequence[int] = (4, 8), *, input_bytes: int = 0) -> str:
    """A markdown table of what each strategy stores for a model with these per-item state shapes."""
    rows = [("full", "full", None)] + [(f"subset, keep={m}", "subset", m) for m in keeps] + [
        ("online + z_K alone (target)", "target", None), ("online", "online", None)]
    lines = ["| strategy | states per item | per item | total |", "|---|---:|---:|---:|"]
    for label, store, keep in rows:
        total = store_bytes(state_shapes, steps, items, store, keep, dtype, input_bytes=input_bytes)
        n = kept_states(store, steps, keep)
        lines.append(f"| {label} | {n} | {human_bytes(total / max(items, 1))} | {human_bytes(total)} |")
    return "\n".join(lines)


class OnlineTeacher:
    """The ``online`` strategy: the frozen teacher's solver runs inside the distillation step.

    :meth:`states` solves the batch from z_0 for exactly K calls of f under no_grad and returns the
    states Algorithm 2 reads, equal to what the ``full`` store would hold for the same input (before
    its storage dtype). Nothing is stored, so the data set's size does not matter; each step costs
    K teacher calls.
    """

    def __init__(self, teacher: nn.Module, steps: int, solver: str = "anderson",
                 solver_options: Optional[dict] = None, amp: Optional[str] = None) -> None:
        from cdeq.norm import reset_norm

        kept_states("full", steps, None)
        self.steps, self.solver, self.solver_options = steps, solver, dict(solver_options or {})
        self.model = copy.deepcopy(teacher).eval().requires_grad_(False)
        reset_norm(self.model)
        self.device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        self.amp = check_amp(amp, self.device)

    def states(self, x: Any, ks: Tensor | Sequence[int],
               z0: Optional[State] = None) -> tuple[State, State, State, State]:
        """``(z_k, z_{k-1}, z_{k-2}, z_K)`` per row for the steps ``ks`` (one per row; k-1 and k-2
        clamped at 0), from ``z0`` (default: the teacher's ``init_state``, the paper's fixed z_0)."""
        from cdeq.solvers import solve

        K = self.steps
        ks = torch.as_tensor(ks, dtype=torch.long).cpu().reshape(-1)
        if bool(((ks < 0) | (ks > K)).any()):
            raise ValueError(f"ks: steps must lie in [0, K={K}], got {ks.tolist()}")
        wanted = sorted({*ks.tolist(), *(ks - 1).clamp_min(0).tolist(), *(ks - 2).clamp_min(0).tolist(), K})
        with torch.no_grad():
            u = self.model.inject(map_state(lambda t: t.to(self.device), x))
            start = self.model.init_state(u) if z0 is None else map_state(lambda t: t.to(self.device), z0)
            if as_tuple(start)[0].shape[0] != len(ks):
                raise ValueError(f"ks: expected one step per row ({as_tuple(start)[0].shape[0]}), got {len(ks)}")
            with amp_layers(self.model, self.amp):
                _, info = solve(lambda z: self.model.layer(z, u), start, solver=self.solver, max_iter=K, tol=0.0,
                                return_states=wanted, check_residual=False, **self.solver_options)
        column = {k: i for i, k in enumerate(wanted)}

        def pick(steps: Tensor) -> State:
            # stack the requested iterates on dim 1 and take each row's own column
            pos = torch.tensor([column[int(k)] for k in steps], device=self.device)
            rows = torch.arange(len(steps), device=self.device)
            return map_state(lambda *parts: torch.stack(parts, dim=1)[rows, pos], *info.states)
        return pick(ks), pick((ks - 1).clamp_min(0)), pick((ks - 2).clamp_min(0)), pick(torch.full_like(ks, K))
