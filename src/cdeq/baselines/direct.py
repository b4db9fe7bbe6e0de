"""The direct baseline: the C-DEQ student's own network, unrolled for J steps, trained on the task.

The control for any gain of distillation: the same :class:`~cdeq.consistency.ConsistencyDEQ`
(same structure, same initialisation from the teacher, same inference, Algorithm 1 with J network
evaluations from z_0) is trained end to end through its J-step rollout on the task loss alone
(through the teacher's frozen readout), with no teacher trajectory, one model per J. It reads the
inputs and labels from a trajectory cache so that both see exactly the same data.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from cdeq.consistency.distill import prepare
from cdeq.state import to_device
from cdeq.consistency.losses import TaskLoss, cross_entropy
from cdeq.config import check_int
from cdeq.consistency.loop import optim_config, run
from cdeq.consistency.student import ConsistencyDEQ
from cdeq.consistency.trajectories import Trajectories


def train_direct(
    student: ConsistencyDEQ,
    trajectories: Trajectories,
    *,
    nfe: int,
    steps: int = 1000,
    lr: float = 1e-3,
    batch_size: int = 64,
    task_loss: Optional[TaskLoss] = None,
    checkpoint_dir: Optional[str] = None,
    resume: bool = True,
    device: Optional[str | torch.device] = None,
    seed: int = 0,
    **optim: Any,
) -> list[dict]:
    """Train ``student`` for inference with ``nfe`` = J steps on the task loss alone.

    ``task_loss(logits, y)`` defaults to cross-entropy ignoring -100. Evaluate it with
    ``student.predict(x, steps=nfe)``. Checkpoints: ``checkpoint_dir/direct-J{nfe}.pt``.
    ``optim``: further :class:`cdeq.consistency.loop.OptimConfig` fields (grad_clip, lr_schedule, ...).
    Returns the training history.
    """
    if not isinstance(student, ConsistencyDEQ):
        raise TypeError(f"student: expected a ConsistencyDEQ, got {type(student).__name__}")
    if not isinstance(trajectories, Trajectories):
        raise TypeError(f"trajectories: expected a Trajectories, got {type(trajectories).__name__}")
    check_int("nfe", nfe, 1)
    check_int("batch_size", batch_size, 1)
    if not trajectories.meta["has_labels"]:
        raise ValueError("trajectories: the direct baseline trains on labels, and this cache holds none")
    dev = prepare(student, trajectories, device)
    task_fn = task_loss or cross_entropy

    def step_fn(step: int, gen: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        student.train()
        shard, rows = trajectories.sample(batch_size, gen)
        x = to_device(trajectories.inputs(shard, rows), dev)
        y = to_device(trajectories.labels(shard, rows), dev)
        loss = task_fn(student.readout(student.rollout(x, nfe)[-1]), y)
        return loss, {}

    config = {"kind": "direct", "teacher_hash": trajectories.meta["teacher_hash"], "structure": student.structure,
              **({"init": student.init} if student.init != "zeros" else {}),
              "schedule": vars(student.schedule), "nfe": nfe, "steps": steps, "lr": lr, "batch_size": batch_size,
              "seed": seed}
    cfg = optim_config(lr, checkpoint_dir, resume, seed, optim)
    history = run(f"direct-J{nfe}", steps=steps, params=student.trainable_parameters(), step_fn=step_fn, cfg=cfg,
                  saved={"student": student}, config=config)
    student.eval()
    return history
