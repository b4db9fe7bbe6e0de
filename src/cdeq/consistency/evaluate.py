"""How close each method's states come to the teacher's fixed points z_K of a trajectory cache."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from cdeq.consistency.losses import relative_error
from cdeq.consistency.trajectories import Trajectories
from cdeq.state import State, to_device


def equilibrium_error(state: Callable[[Any, int], State], trajectories: Trajectories, nfes: Sequence[int], *,
                      batch_size: int = 256, max_items: Optional[int] = None,
                      device: Optional[torch.device] = None) -> dict[int, float]:
    """Mean ||z - z_K|| / ||z_K|| of ``state(x, nfe)`` over the cached items, for each NFE.

    ``state`` is a method's ``state`` (e.g. ``student.state`` or ``hyper.state``).
    """
    device = device or torch.device("cpu")
    sums = {int(k): 0.0 for k in nfes}
    n = 0
    for shard, rows in trajectories.chunks(batch_size):
        if max_items is not None and n >= max_items:
            break
        x = to_device(trajectories.inputs(shard, rows), device)
        z_star = to_device(trajectories.states(shard, rows, trajectories.steps, augmented=False), device)
        with torch.no_grad():
            for k in sums:
                sums[k] += float(relative_error(state(x, k), z_star).sum())
        n += len(rows)
    return {k: v / max(n, 1) for k, v in sums.items()}


def teacher_error(trajectories: Trajectories, nfes: Sequence[int], max_items: Optional[int] = None) -> dict[int, float]:
    """Mean ||z_k - z_K|| / ||z_K|| of the teacher's own iterates (its state after k calls of f)."""
    sums = {int(k): 0.0 for k in nfes}
    n = 0
    for shard, rows in trajectories.chunks(256):
        if max_items is not None and n >= max_items:
            break
        z_star = trajectories.states(shard, rows, trajectories.steps, augmented=False)
        for k in sums:
            sums[k] += float(relative_error(trajectories.states(shard, rows, k, augmented=False), z_star).sum())
        n += len(rows)
    return {k: v / max(n, 1) for k, v in sums.items()}
