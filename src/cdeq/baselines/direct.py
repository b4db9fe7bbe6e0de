"""The direct baseline: the C-DEQ student's own network, unrolled for J steps, trained on the task.

The control for any gain of distillation: the same :class:`~cdeq.consistency.ConsistencyDEQ`
(same structure, same initialisation from the teacher, same inference, Algorithm 1 with J network
evaluations from z_0) is trained end to end through its J-step rollout on the task loss alone
(through the teacher's frozen readout), with no teacher trajectory, one model per J. It reads the
inputs and labels from a trajectory cache so that both see exactly the same data.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from cdeq.consistency.distill import to_device
from cdeq.consistency.losses import TaskLoss, cross_entropy
from cdeq.consistency.loop import OptimConfig, run
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
    weight_decay: float = 0.0,
    grad_clip: Optional[float] = 1.0,
    lr_schedule: str = "cosine",
    warmup: int = 0,
    checkpoint_dir: Optional[str] = None,
    checkpoint_every: int = 500,
    resume: bool = True,
    device: Optional[str | torch.device] = None,
    seed: int = 0,
    log_every: int = 50,
    progress: bool = True,
) -> list[dict]:
    """Train ``student`` for inference with ``nfe`` = J steps on the task loss alone.

    ``task_loss(logits, y)`` defaults to cross-entropy ignoring -100. Evaluate it with
    ``student.predict(x, steps=nfe)``. Checkpoints: ``checkpoint_dir/direct-J{nfe}.pt``.
    Returns the training history.
    """
    if not isinstance(student, ConsistencyDEQ):
        raise TypeError(f"student: expected a ConsistencyDEQ, got {type(student).__name__}")
    if not isinstance(trajectories, Trajectories):
        raise TypeError(f"trajectories: expected a Trajectories, got {type(trajectories).__name__}")
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe: expected an int >= 1 (the J of this model), got {nfe!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    if not trajectories.meta["has_labels"]:
        raise ValueError("trajectories: the direct baseline trains on labels, and this cache holds none")
    dev = torch.device(device) if device is not None else next(student.parameters()).device
    student.to(dev)
    student.build(to_device(trajectories.inputs(0, [0]), dev))
    task_fn = task_loss or cross_entropy

    def step_fn(step: int, gen: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        student.train()
        shard, rows = trajectories.sample(batch_size, gen)
        x = to_device(trajectories.inputs(shard, rows), dev)
        y = to_device(trajectories.labels(shard, rows), dev)
        loss = task_fn(student.readout(student.rollout(x, nfe)[-1]), y)
        return loss, {}

    cfg = OptimConfig(lr=lr, weight_decay=weight_decay, grad_clip=grad_clip, lr_schedule=lr_schedule, warmup=warmup,
                      checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
                      checkpoint_every=checkpoint_every, resume=resume, seed=seed, log_every=log_every,
                      progress=progress)
    config = {"kind": "direct", "teacher_hash": trajectories.meta["teacher_hash"], "structure": student.structure,
              "schedule": vars(student.schedule), "nfe": nfe, "steps": steps, "lr": lr, "batch_size": batch_size,
              "seed": seed}
    history = run(f"direct-J{nfe}", steps=steps, params=student.trainable_parameters(), step_fn=step_fn, cfg=cfg,
                  saved={"student": student}, config=config)
    student.eval()
    return history
