"""Consistency distillation of a C-DEQ from cached teacher trajectories (Algorithm 2).

Each step draws a batch of items and a solver step k per item (:func:`draw_batch`) and takes an
optimiser step on :class:`~cdeq.consistency.losses.ConsistencyLoss` (Eq. 11); after it the EMA
target moves towards the student (:class:`DistillLoop`, the shared :class:`~cdeq.training.TrainLoop`
with that one hook). Every setting is a field of :class:`~cdeq.consistency.DistillConfig`.

Example:
    >>> student = ConsistencyDEQ(teacher, structure="anderson", init="linear")  # doctest: +SKIP
    >>> distill(student, trajectories, DistillConfig(steps=300, rollout_steps=2))  # doctest: +SKIP
    >>> student.predict(x, nfe=2)  # doctest: +SKIP
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from cdeq import distributed
from cdeq.consistency.config import DistillConfig
from cdeq.consistency.losses import ConsistencyLoss, DistillBatch, StateLoss, mean_square
from cdeq.consistency.sharded import ShardedTrajectories
from cdeq.consistency.store import OnlineTeacher
from cdeq.consistency.student import ConsistencyDEQ
from cdeq.consistency.trajectories import Trajectories
from cdeq.state import State, StateLayout, map_state, to_device
from cdeq.training import BatchStream, TrainLoop, step_generator


def check_state_shapes(student_state: State, traj: Trajectories) -> None:
    """Raise unless the student's states have the cache's per-item shapes and structure."""
    lay = StateLayout(student_state, "student state")
    shapes = [list(s[1:]) for s in lay.shapes]
    if shapes != [list(s) for s in traj.layout_shapes] or lay.is_tuple != traj.is_tuple:
        raise ValueError(f"trajectories: states of the wrong shape: the cache holds {traj.layout_shapes} "
                         f"(tuple={traj.is_tuple}) per item, the student's are {shapes} (tuple={lay.is_tuple})")


def prepare(model: Any, trajectories: Trajectories, device: Optional[str | torch.device]) -> torch.device:
    """Check that ``model`` (a student or HyperDEQ, with a frozen ``teacher`` copy) belongs to the
    cache (same teacher, same state shapes), move it to ``device`` and build it; returns the device."""
    if not isinstance(trajectories, (Trajectories, ShardedTrajectories)):
        raise TypeError(f"trajectories: expected a Trajectories, got {type(trajectories).__name__}")
    trajectories.check_teacher(model.teacher)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    x0 = to_device(trajectories.inputs(0, [0]), dev)
    model.build(x0)
    with torch.no_grad():
        check_state_shapes(model.teacher.init_state(model.teacher.inject(x0)), trajectories)
    return dev


def trajectory_stream(draw: Callable[[torch.Generator], Any], seed: int) -> BatchStream:
    """One endless epoch of batches, step s drawn with :func:`~cdeq.training.step_generator` (seed, s),
    so a resumed run starts at its step without replaying the earlier ones."""

    def stream(epoch: int, offset: int) -> Iterator[Any]:
        return (draw(step_generator(seed, step)) for step in itertools.count(offset))
    return stream


def draw_batch(trajectories: Trajectories, cfg: DistillConfig, gen: torch.Generator, device: torch.device,
               online: Optional[OnlineTeacher] = None) -> DistillBatch:
    """Items, steps k ~ U{0..K} (U{1..K} without ``include_k0``) and the states the loss reads;
    from a ``subset`` store k is drawn among the kept steps, and the nearest kept steps below it
    stand for k-1 and k-2 (:meth:`~cdeq.consistency.Trajectories.draw_steps`). With ``online`` the
    states come from the teacher's own solve of the batch (the store then holds inputs and z_K
    only), and k is drawn as from a full store, so the same seed draws the same k.

    Every rank draws the same global batch and keeps its strided share of the rows; the distances'
    scale (the mean square of z_K) is that of the global batch, so it is the same on every rank."""
    shard, global_rows = trajectories.sample(cfg.batch_size, gen)
    K = trajectories.steps
    if online is None:
        k, k_prev, k_prev2 = trajectories.draw_steps(shard, global_rows, gen, include_k0=cfg.include_k0)
    else:
        k = torch.randint(0 if cfg.include_k0 else 1, K + 1, (len(global_rows),), generator=gen)
        k_prev, k_prev2 = (k - 1).clamp_min(0), (k - 2).clamp_min(0)
    anchor_u = torch.rand(len(global_rows), generator=gen) if cfg.anchor_weight > 0 else None
    z_star = trajectories.states(shard, global_rows, K, augmented=False)
    scale = float(mean_square(z_star)) if cfg.normalize else 1.0
    mine = torch.tensor(distributed.local_positions(len(global_rows)), dtype=torch.long)
    rows = distributed.local_rows(global_rows)
    if len(rows) < len(global_rows):
        k, k_prev, k_prev2, z_star = k[mine], k_prev[mine], k_prev2[mine], map_state(lambda p: p[mine], z_star)
        anchor_u = None if anchor_u is None else anchor_u[mine]

    def read(ks: torch.Tensor) -> State:
        return to_device(trajectories.states(shard, rows, ks.tolist()), device)

    x, y = to_device(trajectories.inputs(shard, rows), device), trajectories.labels(shard, rows)
    if online is None:
        z_k, z_prev = read(k), read(k_prev)
        z_prev2 = read(k_prev2) if cfg.lambda_global < 1.0 else None
    else:
        z_k, z_prev, z_prev2, _ = (to_device(z, device) for z in online.states(x, k))
    return DistillBatch(x=x, y=None if y is None else to_device(y, device), k=k, k_prev=k_prev, k_prev2=k_prev2,
                        z_k=z_k, z_prev=z_prev, z_prev2=z_prev2, z_star=to_device(z_star, device), anchor_u=anchor_u,
                        scale=scale)


class DistillLoop(TrainLoop):
    """The training loop of a :class:`ConsistencyLoss`: after every step, the EMA target update."""

    def after_step(self) -> None:
        self.model.update_target()


def distill(student: ConsistencyDEQ, trajectories: Trajectories, config: DistillConfig = DistillConfig(), *,
            run_dir: Optional[str | Path] = None, device: Optional[str | torch.device] = None,
            state_loss: Optional[StateLoss] = None, progress: Optional[bool] = None,
            online: Optional[OnlineTeacher] = None) -> list[dict[str, Any]]:
    """Distil ``student`` on ``trajectories`` for ``config.steps`` steps; returns the training history.

    ``run_dir`` keeps the checkpoint (a rerun resumes it) and the metrics; ``state_loss(z, y)``, the
    task term's loss at a state, defaults to cross-entropy of the readout ignoring -100; ``online`` (an :class:`OnlineTeacher` with the cache's
    K) computes the teacher's states of each batch in the step, so the cache need hold only the
    inputs and z_K (``Storage("target")``).
    """
    if not isinstance(student, ConsistencyDEQ):
        raise TypeError(f"student: expected a ConsistencyDEQ, got {type(student).__name__}")
    dev = prepare(student, trajectories, device)
    loss = ConsistencyLoss(student, config, state_loss)
    meta = {"teacher_hash": trajectories.meta["teacher_hash"], "student": student.describe()}
    if online is not None and online.steps != trajectories.steps:
        raise ValueError(f"online: the teacher solves {online.steps} steps, the cache's K is {trajectories.steps}")
    stream = trajectory_stream(lambda gen: draw_batch(trajectories, config, gen, dev, online), config.seed)
    metrics = DistillLoop(loss, loss, stream, config, run_dir, name="distill", meta=meta, progress=progress).run()
    student.eval()
    return metrics["history"]
