"""The direct baseline: the C-DEQ student's own network, unrolled for J steps, trained on the task.

The control for any gain of distillation: the same :class:`~cdeq.consistency.ConsistencyDEQ`
(same structure, same initialisation from the teacher, same inference, Algorithm 1 with J network
evaluations from z_0) is trained end to end through its J-step rollout on the task loss alone
(through the teacher's frozen readout), with no teacher trajectory, one model per J. It reads the
inputs and labels from a trajectory cache so that both see exactly the same data.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from cdeq import distributed
from cdeq.consistency.config import DirectConfig
from cdeq.consistency.distill import prepare, trajectory_stream
from cdeq.consistency.losses import StateLoss, readout_cross_entropy
from cdeq.consistency.student import ConsistencyDEQ
from cdeq.consistency.trajectories import Trajectories
from cdeq.state import to_device
from cdeq.training import TrainLoop


class DirectLoss(nn.Module):
    """The task loss at the student's state after ``config.nfe`` steps of Algorithm 1; a batch is
    ``(x, y)``. ``state_loss(z, y)`` defaults to cross-entropy of the student's readout at z."""

    def __init__(self, student: ConsistencyDEQ, config: DirectConfig, state_loss: Optional[StateLoss] = None) -> None:
        super().__init__()
        self.student, self.config = student, config
        self.state_loss = state_loss or readout_cross_entropy(student)

    def forward(self, batch: tuple[Any, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x, y = batch
        return self.state_loss(self.student.rollout(x, self.config.nfe)[-1], y), {}


def train_direct(student: ConsistencyDEQ, trajectories: Trajectories, config: DirectConfig, *,
                 run_dir: Optional[str | Path] = None, device: Optional[str | torch.device] = None,
                 state_loss: Optional[StateLoss] = None, progress: Optional[bool] = None) -> list[dict]:
    """Train ``student`` for inference with ``config.nfe`` = J steps on the task loss alone
    (``state_loss(z, y)`` at its last state; default: cross-entropy of the readout ignoring -100, and
    an adaptive softmax's own loss, ``lambda z, y: teacher.lm_loss(z, y)``, skips the full logits);
    evaluate it with ``student.predict(x, nfe=J)``. ``run_dir`` keeps the checkpoint (a rerun resumes
    it). Returns the training history."""
    if not isinstance(student, ConsistencyDEQ):
        raise TypeError(f"student: expected a ConsistencyDEQ, got {type(student).__name__}")
    if not isinstance(config, DirectConfig):
        raise TypeError(f"config: expected a DirectConfig, got {type(config).__name__}")
    if not trajectories.meta["has_labels"]:
        raise ValueError("trajectories: the direct baseline trains on labels, and this cache holds none")
    dev = prepare(student, trajectories, device)

    def draw(gen: torch.Generator) -> tuple[Any, Tensor]:
        shard, rows = trajectories.sample(config.batch_size, gen)
        rows = distributed.local_rows(rows)
        return to_device(trajectories.inputs(shard, rows), dev), to_device(trajectories.labels(shard, rows), dev)

    loss = DirectLoss(student, config, state_loss)
    meta = {"teacher_hash": trajectories.meta["teacher_hash"], "student": student.describe()}
    metrics = TrainLoop(loss, loss, trajectory_stream(draw, config.seed), config, run_dir, name=f"direct-J{config.nfe}",
                        meta=meta, progress=progress).run()
    student.eval()
    return metrics["history"]
