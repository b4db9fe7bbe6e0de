"""Consistency distillation of a C-DEQ from cached teacher trajectories (Algorithm 2, Eq. 9-11, 14).

One optimiser step draws a batch of items and a solver step k per item and minimises
``lambda_global * L_global + (1 - lambda_global) * L_local + lambda_task * L_task`` (Eq. 11):

- global (Eq. 9): d(g(z_{t_k}, t_k, x), z_K);
- local (Eq. 10): d(g(z_{t_k}, t_k, x), g^-(z_{t_{k-1}}, t_{k-1}, x)) against the EMA target g^-
  (phi^- <- mu phi^- + (1 - mu) phi), on the items with k >= 1;
- task (Eq. 14, B.4): the task loss of the teacher's frozen readout of g on early times k <= task_max_k.

Two changes from Algorithm 2 as printed, both on by default, make the student train on the states
that inference visits: k is drawn from {0, ..., K} (Algorithm 1 evaluates g at t_0 = eps from z_0,
which k ~ U{1, K} never trains), and *self-rollout*: the student is also rolled out from z_0 for
``rollout_steps`` steps along the inference schedule (Algorithm 1 with gradients) and the global
and task losses are applied to each step's output, so that it learns to refine its own earlier
estimates and not only the teacher's states (set ``rollout_steps=0`` for Algorithm 2 alone).
With ``rollout_weight`` w, L_global = (L_global on teacher states + w * mean over rollout steps) / (1 + w).

A third change (not in the paper), off unless ``anchor_weight`` > 0 (the pipeline uses 10),
anchors the student's own fixed point to the teacher's: L_anchor = d(h(z_K, t, x), z_K) at a time
t ~ U[eps, T] per item (h of Eq. 8), added with that weight; it costs one more network evaluation
per optimiser step.
Without it nothing ties h at z* to z*: the teacher-state terms near z* are scaled by
c_out(t_k)^2 ~ 0 (Eq. 5), and the rollout only asks each step's output, c_skip z + c_out P, to land
on z*. The student's iteration then settles on a point of its own (Fashion-MNIST: relative
residual under the teacher's f stuck at 4.3e-2 from NFE 4 to 32, whatever the inference times);
with weight 10 it kept falling (8.6e-3 at NFE 8) and C-DEQ's test accuracy at NFE 8 rose from
91.29% to 91.99% (results/fashion-mnist, same teacher).

A student with a learned initial state (``ConsistencyDEQ(init=...)``) has its own z_0 stand in for
the cached z_0 wherever that is read (the state at k = 0, the previous states at k = 1, 2), so the
initialiser learns through the global, local and task losses at t_0 and through the rollout.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from cdeq.consistency.losses import DISTANCES, TaskLoss, cross_entropy, mean_square, relative_error, state_distance
from cdeq.config import check_choice, check_int, check_number
from cdeq.consistency.loop import optim_config, run
from cdeq.consistency.student import ConsistencyDEQ
from cdeq.consistency.trajectories import Trajectories
from cdeq.state import State, StateLayout, map_state, to_device


def select_rows(z: State, mask: Tensor) -> State:
    """The rows of a batched state where ``mask`` (B,) is True."""
    return map_state(lambda p: p[mask], z)


def replace_rows(z: State, mask: Tensor, new: State) -> State:
    """``z`` with the rows where ``mask`` (B,) is True taken from ``new`` (same structure)."""
    return map_state(lambda a, b: torch.where(mask.reshape(-1, *([1] * (a.dim() - 1))), b.to(a.dtype), a), z, new)


def select_labels(y: Tensor, mask: Tensor) -> Optional[Tensor]:
    """Labels of the selected rows; labels not batched per item (one graph: y is (N,)) go whole
    when the single item is selected and not at all otherwise."""
    if y.shape[0] == mask.shape[0]:
        return y[mask]
    if mask.shape[0] != 1:
        raise ValueError(f"labels: expected a first dimension of {mask.shape[0]} (the batch), got {tuple(y.shape)}")
    return y if bool(mask[0]) else None


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
    trajectories.check_teacher(model.teacher)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    x0 = to_device(trajectories.inputs(0, [0]), dev)
    model.build(x0)
    with torch.no_grad():
        check_state_shapes(model.teacher.init_state(model.teacher.inject(x0)), trajectories)
    return dev


def equilibrium_error(infer: Callable[[Any, int], State], trajectories: Trajectories, nfes: Sequence[int], *,
                      batch_size: int = 256, max_items: Optional[int] = None,
                      device: Optional[torch.device] = None) -> dict[int, float]:
    """Mean ||z - z_K|| / ||z_K|| of ``infer(x, nfe)`` over the cached items, for each NFE.

    ``infer`` is e.g. ``lambda x, k: student.infer(x, steps=k)`` or ``lambda x, k: hyper.solve(x, nfe=k)``.
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
                sums[k] += float(relative_error(infer(x, k), z_star).sum())
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


def check_loss_settings(*, distance: str, lambda_global: float, lambda_task: float, ema: float,
                        rollout_weight: float, anchor_weight: float) -> None:
    """Raise a ValueError naming the first of :func:`distill`'s loss settings that is out of range
    (also called by the pipeline, before any stage runs)."""
    check_choice("distance", distance, DISTANCES)
    check_number("lambda_global", lambda_global, 0.0, 1.0)  # Eq. 11
    check_number("lambda_task", lambda_task, 0.0)
    check_number("ema", ema, 0.0, 1.0, high_open=True)
    check_number("rollout_weight", rollout_weight, 0.0)
    check_number("anchor_weight", anchor_weight, 0.0)


def distill(
    student: ConsistencyDEQ,
    trajectories: Trajectories,
    *,
    steps: int = 2000,
    lr: float = 1e-3,
    batch_size: int = 64,
    lambda_global: float = 0.8,
    lambda_task: float = 0.05,
    ema: float = 0.999,
    distance: str = "mse",
    huber_delta: float = 0.1,
    normalize: bool = True,
    include_k0: bool = True,
    rollout_steps: int = 4,
    rollout_weight: float = 10.0,
    rollout_detach: bool = False,
    anchor_weight: float = 0.0,
    task_max_k: int = 2,
    task_loss: Optional[TaskLoss] = None,
    checkpoint_dir: Optional[str] = None,
    resume: bool = True,
    device: Optional[str | torch.device] = None,
    seed: int = 0,
    eval_nfes: Sequence[int] = (1, 2, 4),
    eval_items: int = 512,
    **optim: Any,
) -> dict:
    """Distil ``student`` on ``trajectories`` for ``steps`` optimiser steps (Algorithm 2, Eq. 11).

    Args (beyond the module docstring's): ``ema`` the target's rate mu; ``distance`` "mse" or
    "huber" (``huber_delta``); ``normalize`` divides the distances by the batch's mean square
    of z_K, so that their size, and the balance with ``lambda_task``, does not depend on the
    scale of the states (the minimiser of each distance term is unchanged); ``include_k0`` draws
    k from {0..K} (else {1..K}, Algorithm 2 as printed); ``rollout_steps`` J_train of self-rollout
    (0 = off); ``rollout_weight`` its weight w (10: the student's residual after 8 steps was 14-30%
    lower than with 1 on all five benchmark tasks, results/<task>-rw1); ``rollout_detach`` cuts the
    gradient between rollout steps; ``anchor_weight`` the weight of L_anchor (off by default: on the
    toy DEQ of the tests, weight 10 doubled the NFE-1 error to z_K); ``task_loss(logits, y)``
    defaults to cross-entropy ignoring -100; ``task_max_k`` the latest teacher step that gets the
    task loss (early times, B.4).
    ``optim``: further :class:`cdeq.consistency.loop.OptimConfig` fields (weight_decay,
    grad_clip=1.0, lr_schedule="cosine", warmup, checkpoint_every=500, log_every=50,
    progress=True). A checkpoint is ``checkpoint_dir/distill.pt``; a rerun resumes it.

    Returns ``{"history": [...], "eval": {"student": {nfe: err}, "teacher": {nfe: err}}}``: the
    training log and the mean relative error to z_K at ``eval_nfes`` on up to ``eval_items`` items.
    """
    if not isinstance(student, ConsistencyDEQ):
        raise TypeError(f"student: expected a ConsistencyDEQ, got {type(student).__name__}")
    if not isinstance(trajectories, Trajectories):
        raise TypeError(f"trajectories: expected a Trajectories, got {type(trajectories).__name__}")
    check_loss_settings(distance=distance, lambda_global=lambda_global, lambda_task=lambda_task, ema=ema,
                        rollout_weight=rollout_weight, anchor_weight=anchor_weight)
    check_int("batch_size", batch_size, 1)
    check_int("rollout_steps", rollout_steps, 0)
    dev = prepare(student, trajectories, device)
    task_fn = task_loss or cross_entropy
    has_labels = bool(trajectories.meta["has_labels"])
    K = trajectories.steps
    sched = student.schedule
    target = copy.deepcopy(student, memo={id(student.teacher): student.teacher}).requires_grad_(False).eval()
    params = student.trainable_parameters()
    tparams = [p for name, p in target.named_parameters() if dict(student.named_parameters())[name].requires_grad]

    def ema_update() -> None:
        with torch.no_grad():
            torch._foreach_lerp_(tparams, params, 1.0 - ema)

    def step_fn(step: int, gen: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        student.train()
        shard, rows = trajectories.sample(batch_size, gen)
        ks = torch.randint(0 if include_k0 else 1, K + 1, (len(rows),), generator=gen)
        km1, km2 = (ks - 1).clamp_min(0), (ks - 2).clamp_min(0)
        read = lambda k: to_device(trajectories.states(shard, rows, k.tolist()), dev)  # noqa: E731
        z_k, z_km1 = read(ks), read(km1)
        z_star = to_device(trajectories.states(shard, rows, K, augmented=False), dev)
        scale = float(mean_square(z_star)) if normalize else 1.0
        dist = lambda a, b: state_distance(a, b, distance, huber_delta, scale)  # noqa: E731
        x = to_device(trajectories.inputs(shard, rows), dev)
        y = to_device(trajectories.labels(shard, rows), dev) if has_labels else None
        ks_d = ks.to(dev)
        t_k, t_km1, t_km2 = (sched.train_time(k).to(dev) for k in (ks, km1, km2))
        u = student.inject(x)
        z_km1_target, z_km2_target = z_km1, (read(km2) if lambda_global < 1.0 else None)
        if student.initialiser is not None:  # the student's own z_0 stands in for the cached one
            z_init = student.initial_state(u)
            z_k, z_km1 = replace_rows(z_k, ks_d == 0, z_init), replace_rows(z_km1, ks_d <= 1, z_init)
        out = student.consistency(u, z_k, t_k, z_km1, t_km1, first=ks_d == 0)
        logs: dict[str, float] = {}
        l_global = dist(out, z_star)
        logs["global_traj"] = float(l_global.detach())
        has_prev = ks_d >= 1
        l_local = torch.zeros((), device=dev)
        if lambda_global < 1.0 and bool(has_prev.any()):
            with torch.no_grad():
                u_target = target.inject(x)
                if target.initialiser is not None:
                    z_init = target.initial_state(u_target)
                    z_km1_target = replace_rows(z_km1_target, ks_d <= 1, z_init)
                    z_km2_target = replace_rows(z_km2_target, ks_d <= 2, z_init)
                tgt = target.consistency(u_target, z_km1_target, t_km1, z_km2_target, t_km2, first=ks_d <= 1)
            l_local = dist(select_rows(out, has_prev), select_rows(tgt, has_prev))
            logs["local"] = float(l_local.detach())
        task_terms: list[Tensor] = []
        if has_labels and lambda_task > 0:
            early = ks_d <= task_max_k
            y_early = select_labels(y, early)
            if y_early is not None and bool(early.any()):
                task_terms.append(task_fn(student.readout(select_rows(out, early)), y_early))
        if rollout_steps > 0:
            outs = student.rollout(x, rollout_steps, detach=rollout_detach, u=u)
            l_roll = torch.stack([dist(o, z_star) for o in outs]).mean()
            logs["global_rollout"] = float(l_roll.detach())
            l_global = (l_global + rollout_weight * l_roll) / (1.0 + rollout_weight)
            if has_labels and lambda_task > 0:
                task_terms.extend(task_fn(student.readout(o), y) for o in outs)
        if anchor_weight > 0:
            t_a = sched.eps + torch.rand(len(rows), generator=gen) * (sched.T - sched.eps)
            l_anchor = dist(student.h(z_star, t_a.to(dev), u), z_star)
            logs["anchor"] = float(l_anchor.detach())
        l_task = torch.stack(task_terms).mean() if task_terms else torch.zeros((), device=dev)
        if task_terms:
            logs["task"] = float(l_task.detach())
        loss = lambda_global * l_global + (1.0 - lambda_global) * l_local + lambda_task * l_task
        if anchor_weight > 0:
            loss = loss + anchor_weight * l_anchor
        return loss, logs

    config = {"kind": "distill", "teacher_hash": trajectories.meta["teacher_hash"], "structure": student.structure,
              **({"init": student.init} if student.init != "zeros" else {}),
              "schedule": vars(sched), "steps": steps, "lr": lr, "batch_size": batch_size,
              "lambda_global": lambda_global, "lambda_task": lambda_task, "ema": ema, "distance": distance,
              "huber_delta": huber_delta, "normalize": normalize, "include_k0": include_k0, "rollout_steps": rollout_steps,
              "rollout_weight": rollout_weight, "rollout_detach": rollout_detach,
              **({"anchor_weight": anchor_weight} if anchor_weight else {}), "task_max_k": task_max_k,
              "seed": seed}
    cfg = optim_config(lr, checkpoint_dir, resume, seed, optim)
    history = run("distill", steps=steps, params=params, step_fn=step_fn, cfg=cfg,
                  saved={"student": student, "target": target}, config=config, after_step=ema_update)
    student.eval()
    nfes = list(eval_nfes)
    result = {"history": history, "eval": {}}
    if nfes:
        result["eval"] = {
            "student": equilibrium_error(lambda x, k: student.infer(x, steps=k), trajectories, nfes,
                                         max_items=eval_items, device=dev),
            "teacher": teacher_error(trajectories, nfes, max_items=eval_items),
        }
    return result
