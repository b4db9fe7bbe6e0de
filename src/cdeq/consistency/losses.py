"""The consistency distillation loss (Eq. 9-11, 14) as one module, and its distances.

:class:`ConsistencyLoss` computes one batch's loss in its ``forward``, one method per term, and
returns ``(loss, terms)``; it holds the student and its EMA target, so the training loop (and a
``DistributedDataParallel`` wrapper around it) sees the whole loss as one module. Distances are
per-element means over every part of a (tuple) state, so their scale does not depend on the
state's size.

Two changes from Algorithm 2 as printed, both in :class:`~cdeq.consistency.DistillConfig`'s
defaults, make the student train on the states inference visits: k is drawn from {0..K}
(Algorithm 1 evaluates g at t_0 from z_0, which k ~ U{1, K} never trains), and self-rollout: the
student is rolled out from z_0 along the inference schedule (Algorithm 1 with gradients) and the
global and task losses apply to each step's output. A third, the anchor term
d(h(z_K, t, x), z_K) at t ~ U[eps, T], ties the student's own fixed point to the teacher's:
near z* the teacher-state terms are scaled by c_out(t_k)^2 ~ 0 (Eq. 5), so nothing else does.
A student with a learned initial state has its own z_0 stand in for the cached z_0 wherever that
is read (the state at k = 0, the previous states at k = 1, 2), so the initialiser learns too.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdeq.consistency.config import DISTANCES, DistillConfig
from cdeq.state import State, as_tuple, map_state

if TYPE_CHECKING:
    from cdeq.consistency.student import ConsistencyDEQ

# The task loss at a state z and labels y (Eq. 14): the teacher's frozen readout and its loss, so a
# readout whose logits cost more than its loss (an adaptive softmax) can skip them.
StateLoss = Callable[[State, Tensor], Tensor]


def mean_square(z: State) -> Tensor:
    """The mean of z^2 over every element of every part (a detached scalar)."""
    total = sum(float((p.detach().float() ** 2).sum()) for p in as_tuple(z))
    return torch.tensor(total / sum(p.numel() for p in as_tuple(z)))


def state_distance(a: State, b: State, kind: str = "mse", delta: float = 0.1, scale: float | Tensor = 1.0) -> Tensor:
    """d(a, b) of Eq. 9-10: ``"mse"`` or ``"huber"`` (quadratic below ``delta``, linear above),
    averaged over all elements of all parts and divided by ``scale``."""
    if kind not in DISTANCES:
        raise ValueError(f"distance: expected one of {DISTANCES}, got {kind!r}")
    total, count = 0.0, 0
    for p, q in zip(as_tuple(a), as_tuple(b)):
        if p.shape != q.shape:
            raise ValueError(f"states of the wrong shape: {tuple(p.shape)} vs {tuple(q.shape)}")
        if kind == "mse":
            total = total + F.mse_loss(p, q, reduction="sum")
        else:
            total = total + F.huber_loss(p, q, reduction="sum", delta=delta)
        count += p.numel()
    return total / (count * scale)


def relative_error(z: State, z_star: State) -> Tensor:
    """Per-sample ||z - z*|| / ||z*||, ``(B,)``: the error to the equilibrium used in reports."""
    num = torch.zeros(as_tuple(z)[0].shape[0], dtype=torch.float64, device=as_tuple(z)[0].device)
    den = torch.zeros_like(num)
    for p, q in zip(as_tuple(z), as_tuple(z_star)):
        d = (p.double() - q.double()).reshape(p.shape[0], -1)
        num += (d * d).sum(dim=1)
        den += (q.double().reshape(q.shape[0], -1) ** 2).sum(dim=1)
    return (num / den.clamp_min(1e-300)).sqrt()


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy over the last dimension of ``logits``; labels -100 are ignored (Eq. 14)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1).long(), ignore_index=-100)


def readout_cross_entropy(model: nn.Module) -> StateLoss:
    """The default :data:`StateLoss`: :func:`cross_entropy` of ``model.readout(z)``."""
    return lambda z, y: cross_entropy(model.readout(z), y)


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


def own_start(model: "ConsistencyDEQ", u: object, *pairs: tuple[State, Tensor]) -> list[State]:
    """Each state with the rows where its mask is True replaced by ``model``'s own z_0 (its learned
    initial state); the states unchanged when the model starts at the teacher's z_0."""
    if model.initialiser is None:
        return [z for z, _ in pairs]
    z_init = model.initial_state(u)
    return [replace_rows(z, mask, z_init) for z, mask in pairs]


@dataclass
class DistillBatch:
    """One step's items: inputs, labels, the drawn steps k and the teacher states the loss reads.

    ``z_prev`` is the state at step ``k_prev`` (k-1, or the nearest kept step below k in a subset
    store) and ``z_prev2`` at ``k_prev2`` (one further down; clamped at 0; ``z_prev2`` only when the
    local term is on); ``k_prev``/``k_prev2`` None mean k-1 and k-2; ``anchor_u`` the uniform draws
    that place the anchor times in [eps, T];
    ``scale`` divides the distances (None: the mean square of this batch's z_K).
    """

    x: object
    y: Optional[Tensor]
    k: Tensor
    z_k: State
    z_prev: State
    z_prev2: Optional[State]
    z_star: State
    anchor_u: Optional[Tensor]
    scale: Optional[float] = None
    k_prev: Optional[Tensor] = None
    k_prev2: Optional[Tensor] = None

    def previous(self) -> tuple[Tensor, Tensor]:
        """The steps of ``z_prev`` and ``z_prev2`` (CPU, like ``k``)."""
        prev = (self.k - 1).clamp_min(0) if self.k_prev is None else self.k_prev
        return prev, (self.k - 2).clamp_min(0) if self.k_prev2 is None else self.k_prev2


class ConsistencyLoss(nn.Module):
    """``lambda_global * L_global + (1 - lambda_global) * L_local + lambda_task * L_task +
    anchor_weight * L_anchor`` of one :class:`DistillBatch` (Eq. 11, plus the anchor term).

    Args:
        student: the :class:`~cdeq.consistency.ConsistencyDEQ` trained (built: W exists).
        config: the :class:`~cdeq.consistency.DistillConfig` (weights, distance, rollout, ...).
        state_loss: ``(z, y) -> loss`` at the student's state (default: cross-entropy, ignoring -100,
            of the teacher's readout of z; e.g. ``lambda z, y: teacher.lm_loss(z, y)``).

    ``target`` is the EMA copy g^- of the student (Eq. 10), updated by :meth:`update_target`.
    """

    def __init__(self, student: "ConsistencyDEQ", config: DistillConfig, state_loss: Optional[StateLoss] = None) -> None:
        super().__init__()
        if not isinstance(config, DistillConfig):
            raise TypeError(f"config: expected a DistillConfig, got {type(config).__name__}")
        self.student, self.config = student, config
        self.state_loss = state_loss or readout_cross_entropy(student)
        self.target = copy.deepcopy(student, memo={id(student.teacher): student.teacher}).requires_grad_(False).eval()
        names = {name for name, p in student.named_parameters() if p.requires_grad}
        self._pairs = [(q, p) for (name, p), (_, q) in zip(student.named_parameters(), self.target.named_parameters())
                       if name in names]

    def train(self, mode: bool = True) -> "ConsistencyLoss":
        """As ``nn.Module.train``, but the EMA target stays in eval mode."""
        super().train(mode)
        self.target.eval()
        return self

    @torch.no_grad()
    def update_target(self) -> None:
        """phi^- <- mu phi^- + (1 - mu) phi (the EMA target of Eq. 10)."""
        torch._foreach_lerp_([q for q, _ in self._pairs], [p for _, p in self._pairs], 1.0 - self.config.ema)

    def distance(self, a: State, b: State, scale: float) -> Tensor:
        return state_distance(a, b, self.config.distance, self.config.huber_delta, scale)

    def forward(self, batch: DistillBatch) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, student = self.config, self.student
        scale = batch.scale
        if scale is None:
            scale = float(mean_square(batch.z_star)) if cfg.normalize else 1.0
        k = batch.k.to(_device(batch.z_star))
        u = student.inject(batch.x)
        out, l_global = self.global_term(u, batch, k, scale)
        terms = {"global_traj": l_global}
        l_local = self.local_term(batch, k, out, scale, terms)
        task = self.task_terms(out, batch.y, k <= cfg.task_max_k)
        if cfg.rollout_steps > 0:
            outs, terms["global_rollout"] = self.rollout_term(batch, u, scale)
            l_global = (l_global + cfg.rollout_weight * terms["global_rollout"]) / (1.0 + cfg.rollout_weight)
            task += [t for o in outs for t in self.task_terms(o, batch.y)]
        l_task = torch.stack(task).mean() if task else torch.zeros((), device=k.device)
        if task:
            terms["task"] = l_task
        loss = cfg.lambda_global * l_global + (1.0 - cfg.lambda_global) * l_local + cfg.lambda_task * l_task
        if cfg.anchor_weight > 0:
            terms["anchor"] = self.anchor_term(batch, u, scale)
            loss = loss + cfg.anchor_weight * terms["anchor"]
        return loss, {name: t.detach() for name, t in terms.items()}

    def global_term(self, u: object, batch: DistillBatch, k: Tensor, scale: float) -> tuple[State, Tensor]:
        """g(z_{t_k}, t_k, x) on the teacher's states and d(g, z_K) (Eq. 9)."""
        sched = self.student.schedule
        prev = batch.previous()[0]
        first_prev = prev.to(k.device) == 0
        z_k, z_prev = own_start(self.student, u, (batch.z_k, k == 0), (batch.z_prev, first_prev))
        t_k, t_prev = (sched.train_time(j).to(k.device) for j in (batch.k, prev))
        out = self.student.consistency(u, z_k, t_k, z_prev, t_prev, first=k == 0)
        return out, self.distance(out, batch.z_star, scale)

    def local_term(self, batch: DistillBatch, k: Tensor, out: State, scale: float, terms: dict) -> Tensor:
        """d(g(z_{t_k}), g^-(z_{t_{k-1}})) against the EMA target on the items with k >= 1 (Eq. 10)."""
        has_prev = k >= 1
        if self.config.lambda_global >= 1.0 or not bool(has_prev.any()):
            return torch.zeros((), device=k.device)
        sched, target = self.student.schedule, self.target
        prev, prev2 = batch.previous()
        first_prev, first_prev2 = prev.to(k.device) == 0, prev2.to(k.device) == 0
        with torch.no_grad():
            u = target.inject(batch.x)
            z_prev, z_prev2 = own_start(target, u, (batch.z_prev, first_prev), (batch.z_prev2, first_prev2))
            t_prev, t_prev2 = (sched.train_time(j).to(k.device) for j in (prev, prev2))
            tgt = target.consistency(u, z_prev, t_prev, z_prev2, t_prev2, first=first_prev)
        terms["local"] = self.distance(select_rows(out, has_prev), select_rows(tgt, has_prev), scale)
        return terms["local"]

    def task_terms(self, out: State, y: Optional[Tensor], mask: Optional[Tensor] = None) -> list[Tensor]:
        """The task loss of the teacher's frozen readout of ``out`` on the rows of ``mask`` (Eq. 14)."""
        if y is None or self.config.lambda_task <= 0:
            return []
        if mask is None:
            return [self.state_loss(out, y)]
        y_sel = select_labels(y, mask)
        if y_sel is None or not bool(mask.any()):
            return []
        return [self.state_loss(select_rows(out, mask), y_sel)]

    def rollout_term(self, batch: DistillBatch, u: object, scale: float) -> tuple[list[State], Tensor]:
        """The student's own J-step inference from its z_0 and the mean of d(z_{t_j}, z_K) over j."""
        outs = self.student.rollout(batch.x, self.config.rollout_steps, detach=self.config.rollout_detach, u=u)
        return outs, torch.stack([self.distance(o, batch.z_star, scale) for o in outs]).mean()

    def anchor_term(self, batch: DistillBatch, u: object, scale: float) -> Tensor:
        """d(h(z_K, t, x), z_K) at t = eps + U (T - eps) per item: z_K a fixed point of h."""
        sched = self.student.schedule
        t = sched.eps + batch.anchor_u * (sched.T - sched.eps)
        return self.distance(self.student.h(batch.z_star, t.to(_device(batch.z_star)), u), batch.z_star, scale)


def _device(z: State) -> torch.device:
    return as_tuple(z)[0].device
