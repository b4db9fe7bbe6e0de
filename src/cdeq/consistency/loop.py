"""The optimisation loop shared by distillation, HyperDEQ and the direct baseline.

AdamW with gradient clipping, a warm-up + cosine (or constant) learning rate, a tqdm progress bar,
a per-step random generator derived from (seed, step) so that a resumed run draws the same batches,
torch's global random stream (dropout) seeded at the start and restored on resume, and atomic
checkpoints (:func:`cdeq.io.save_checkpoint`, loaded with ``weights_only=True``) every
``checkpoint_every`` steps; a run killed part-way resumes from its last checkpoint.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from cdeq.config import check_int
from cdeq.io import load_checkpoint, random_state, restore_random_state, save_checkpoint

LR_SCHEDULES = ("cosine", "constant")
StepFn = Callable[[int, torch.Generator], tuple[Tensor, dict[str, float]]]


@dataclass
class OptimConfig:
    """Optimiser settings of a training run (every field has a working default)."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: Optional[float] = 1.0
    lr_schedule: str = "cosine"
    warmup: int = 0
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 500
    resume: bool = True
    seed: int = 0
    log_every: int = 50
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive learning rate, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule: expected one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip: expected a positive norm or None, got {self.grad_clip}")
        check_int("checkpoint_every", self.checkpoint_every, 1)
        check_int("log_every", self.log_every, 1)
        check_int("warmup", self.warmup, 0)


def optim_config(lr: float, checkpoint_dir: Any, resume: bool, seed: int, options: dict) -> OptimConfig:
    """An :class:`OptimConfig` from a training function's arguments; unknown options are an error."""
    known = set(OptimConfig.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; valid: {sorted(known - {'lr', 'checkpoint_dir', 'resume', 'seed'})}")
    return OptimConfig(lr=lr, checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir), resume=resume,
                       seed=seed, **options)


def _lr_at(cfg: OptimConfig, step: int, steps: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    frac = (step - cfg.warmup) / max(steps - cfg.warmup, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random generator of one training step: the same (seed, step) draws the same batch."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))


def run(name: str, *, steps: int, params: list[nn.Parameter], step_fn: StepFn, cfg: OptimConfig,
        saved: dict[str, Any], config: dict, after_step: Optional[Callable[[], None]] = None) -> list[dict]:
    """Run ``steps`` optimiser steps of ``step_fn`` (which returns the loss and logged numbers).

    ``saved``: objects with ``state_dict``/``load_state_dict`` kept in checkpoints (the models, an
    EMA target). ``config``: the JSON-able settings of the run; resuming a checkpoint written with
    other settings is an error. ``after_step`` runs after every optimiser step (e.g. an EMA
    update). Returns the history: the logged numbers averaged over every ``log_every`` steps.
    """
    from tqdm.auto import tqdm

    check_int("steps", steps, 1)
    if not params:
        raise ValueError(f"{name}: no trainable parameters")
    config = json.loads(json.dumps(config))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = Path(cfg.checkpoint_dir) / f"{name}.pt" if cfg.checkpoint_dir else None
    history: list[dict] = []
    start = 0
    # Batches come from step_generator; dropout draws from the global stream, seeded here so that a
    # run does not depend on what its process did before (an ablation's 10th student equals a run's first).
    torch.manual_seed(cfg.seed)
    if ckpt is not None and ckpt.exists() and cfg.resume:
        state = load_checkpoint(ckpt)
        if state["config"] != config:
            diff = sorted(k for k in set(config) | set(state["config"]) if config.get(k) != state["config"].get(k))
            raise ValueError(f"checkpoint_dir: {ckpt} was written by a run with other settings ({diff}); "
                             "use another checkpoint_dir or resume=False")
        for key, obj in saved.items():
            obj.load_state_dict(state["saved"][key])
        opt.load_state_dict(state["optimizer"])
        history, start = state["history"], state["step"]
        restore_random_state(state["rng"])

    def checkpoint(step: int) -> None:
        if ckpt is not None:
            save_checkpoint(ckpt, {"step": step, "config": config, "history": history,
                                   "saved": {k: v.state_dict() for k, v in saved.items()},
                                   "optimizer": opt.state_dict(), "rng": random_state()})

    sums: dict[str, float] = {}
    count = 0
    bar = tqdm(range(start, steps), desc=name, disable=not cfg.progress, initial=start, total=steps)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step, steps)
        loss, logs = step_fn(step, step_generator(cfg.seed, step))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name}: non-finite loss {loss.item()} at step {step}; lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        opt.step()
        if after_step is not None:
            after_step()
        logs["loss"] = float(loss.detach())
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        count += 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            history.append({"step": step + 1, "lr": opt.param_groups[0]["lr"],
                            **{k: v / count for k, v in sums.items()}})
            bar.set_postfix(loss=f"{history[-1]['loss']:.4g}")
            sums, count = {}, 0
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps:
            checkpoint(step + 1)
    bar.close()
    return history
