"""Settings of the trainers that learn from teacher trajectories, one frozen dataclass each.

:class:`DistillConfig` holds every loss and optimisation setting of consistency distillation
(Algorithm 2, Eq. 9-11, 14 of the C-DEQ paper) with the defaults ``cdeq run`` uses: the one set of
defaults in the project. It is validated on construction, so a bad value fails with its name.

Example:
    >>> cfg = DistillConfig(steps=300, anchor_weight=0.0)
    >>> cfg.lambda_global, cfg.min_lr_ratio
    (0.8, 0.1)
    >>> DistillConfig(lambda_global=1.5)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ValueError: lambda_global: expected a number in [0.0, 1.0], got 1.5
"""
from __future__ import annotations

from dataclasses import dataclass

from cdeq.config import check_bool, check_choice, check_int, check_number
from cdeq.training import OptimConfig

DISTANCES = ("mse", "huber")


@dataclass(frozen=True)
class TrajectoryTraining(OptimConfig):
    """What every trainer on cached trajectories shares: items per step, a schedule floor of 0.1
    of the peak learning rate, and sparser checkpoints and logs than the teacher's."""

    min_lr_ratio: float = 0.1
    checkpoint_every: int = 500
    log_every: int = 50
    batch_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("batch_size", self.batch_size, 1)


@dataclass(frozen=True)
class DistillConfig(TrajectoryTraining):
    """Consistency distillation: ``lambda_global * L_global + (1 - lambda_global) * L_local +
    lambda_task * L_task + anchor_weight * L_anchor`` (Eq. 11, plus the anchor term).

    Args:
        lambda_global: lambda_1 of Eq. 11, the weight of the global term (Eq. 9) against the
            local one (Eq. 10).
        lambda_task: lambda_2, the weight of the task loss on early times (Eq. 14, B.4).
        ema: the EMA target's rate mu (phi^- <- mu phi^- + (1 - mu) phi).
        distance: d of Eq. 9-10, ``"mse"`` or ``"huber"`` (quadratic below ``huber_delta``).
        normalize: divide the distances by the batch's mean square of z_K, so their size and the
            balance with ``lambda_task`` do not depend on the scale of the states.
        include_k0: draw k from {0..K} (Algorithm 1 evaluates g at t_0 from z_0); False draws
            from {1..K} as Algorithm 2 prints it.
        rollout_steps: J of self-rollout, the student's own inference with gradients (0: off);
            ``cdeq run`` sets it to its largest NFE.
        rollout_weight: w in L_global = (L_global on teacher states + w * L_rollout) / (1 + w).
        rollout_detach: cut the graph between rollout steps.
        anchor_weight: weight of L_anchor = d(h(z_K, t), z_K) (not in the paper), which ties the
            student's own fixed point to the teacher's.
        task_max_k: the latest teacher step whose student output gets the task loss.
    """

    steps: int = 2000
    lambda_global: float = 0.8
    lambda_task: float = 0.05
    ema: float = 0.999
    distance: str = "mse"
    huber_delta: float = 0.1
    normalize: bool = True
    include_k0: bool = True
    rollout_steps: int = 8
    rollout_weight: float = 10.0
    rollout_detach: bool = False
    anchor_weight: float = 10.0
    task_max_k: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("lambda_global", self.lambda_global, 0.0, 1.0)
        check_number("lambda_task", self.lambda_task, 0.0)
        check_number("ema", self.ema, 0.0, 1.0, high_open=True)
        check_choice("distance", self.distance, DISTANCES)
        check_number("huber_delta", self.huber_delta, 0.0, low_open=True)
        check_int("rollout_steps", self.rollout_steps, 0)
        check_number("rollout_weight", self.rollout_weight, 0.0)
        check_number("anchor_weight", self.anchor_weight, 0.0)
        check_int("task_max_k", self.task_max_k, 0)
        for name in ("normalize", "include_k0", "rollout_detach"):
            check_bool(name, getattr(self, name))


@dataclass(frozen=True)
class HyperDEQConfig(TrajectoryTraining):
    """HyperDEQ training: ``init_weight * d(z_0, z*) + mean_{k=1..train_nfe} d(z_k, z*)``."""

    steps: int = 1000
    train_nfe: int = 6
    init_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("train_nfe", self.train_nfe, 1)
        check_number("init_weight", self.init_weight, 0.0)


@dataclass(frozen=True)
class DirectConfig(TrajectoryTraining):
    """The direct baseline: the student unrolled for ``nfe`` steps, trained on the task loss alone."""

    steps: int = 1000
    nfe: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("nfe", self.nfe, 1)
