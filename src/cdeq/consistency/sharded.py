"""A trajectory cache sampled by several ranks, read as one.

With N ranks, rank r samples the input batches i with i % N == r into its own cache
``ROOT/w{N}-r{r}/`` (its own shard files and manifest, resumed on its own), and the main rank
writes ``ROOT/parts.json`` when all are done. :class:`ShardedTrajectories` reads the parts with the
global shard order of a one-rank cache (global shard g is part g % N, shard g // N), so every
sampler, and so every distillation step, sees the items exactly as a one-rank cache holds them.
:func:`open_trajectories` opens either kind.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from torch import nn

from cdeq.consistency.trajectories import META_FILE, Trajectories
from cdeq.io import atomic_write_json

PARTS_FILE = "parts.json"
_PER_SHARD = ("states", "inputs", "labels", "residuals", "augmentation_mask", "kept_steps", "draw_steps")


def part_dir(root: str | Path, world: int, rank: int) -> Path:
    """Where rank ``rank`` of ``world`` samples its share (the root itself with one rank)."""
    return Path(root) if world == 1 else Path(root) / f"w{world}-r{rank}"


def write_parts(root: str | Path, world: int) -> None:
    """The manifest of a cache sampled by ``world`` ranks (written by the main rank once all are done)."""
    parts = [part_dir(root, world, r).name for r in range(world)]
    for name in parts:
        if not (Path(root) / name / META_FILE).is_file():
            raise FileNotFoundError(f"trajectories: part {name} of {root} has no {META_FILE}; a rank did not finish")
    atomic_write_json(Path(root) / PARTS_FILE, {"world": world, "parts": parts})


def open_trajectories(root: str | Path, *, teacher: Optional[nn.Module] = None) -> "Trajectories | ShardedTrajectories":
    """A one-rank cache, or the parts of a cache sampled by several ranks as one."""
    manifest = Path(root) / PARTS_FILE
    if not manifest.is_file():
        return Trajectories.open(root, teacher=teacher)
    spec = json.loads(manifest.read_text())
    return ShardedTrajectories([Trajectories.open(Path(root) / name, teacher=teacher) for name in spec["parts"]])


class ShardedTrajectories:
    """Several ranks' parts of one cache, with a one-rank cache's interface and shard order."""

    def __init__(self, parts: list[Trajectories]) -> None:
        if not parts:
            raise ValueError("parts: expected at least one trajectory cache")
        keys = {(p.meta["teacher_hash"], p.steps, tuple(map(tuple, p.layout_shapes))) for p in parts}
        if len(keys) > 1:
            raise ValueError(f"parts: the caches disagree on teacher, K or state shapes: {sorted(keys)}")
        self.parts = parts
        world = len(parts)
        self._index = [(g % world, g // world) for g in range(sum(p.num_shards for p in parts))]

    def __getattr__(self, name: str) -> Any:
        if name in _PER_SHARD:
            return self._per_shard(name)
        return getattr(self.parts[0], name)  # meta, steps, layout_shapes, is_tuple, check_teacher, ...

    def _per_shard(self, name: str) -> Callable[..., Any]:
        def method(shard: int, *args: Any, **kwargs: Any) -> Any:
            if not 0 <= shard < len(self._index):
                raise IndexError(f"shard: expected 0 <= shard < {len(self._index)}, got {shard}")
            part, local = self._index[shard]
            return getattr(self.parts[part], name)(local, *args, **kwargs)
        return method

    @property
    def shard_sizes(self) -> list[int]:
        return [self.parts[p].shard_sizes[s] for p, s in self._index]

    @property
    def num_shards(self) -> int:
        return len(self._index)

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    sample = Trajectories.sample
    chunks: Callable[..., Iterator[tuple[int, list[int]]]] = Trajectories.chunks
    mean_residuals = Trajectories.mean_residuals
