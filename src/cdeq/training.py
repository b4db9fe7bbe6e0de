"""The generic training loop: AdamW with a warm-up + cosine schedule, resumable after a kill.

:func:`fit` trains any ``nn.Module`` given a loss function and a seeded batch stream; teachers,
explicit baselines, and whoever else needs a plain supervised loop share it. It writes into
``run_dir``:

- ``checkpoint.pt`` every ``checkpoint_every`` steps and at the end, atomically
  (:func:`cdeq.io.save_checkpoint`): model, optimiser, scheduler, step, epoch and position in
  it, the torch RNG state and the history; loaded with ``weights_only=True``;
- ``best.pt`` (model weights only) whenever the validation metric improves, if there is one;
- ``metrics.json`` at the end: the config, the history, the final evaluation and the wall time.

Resuming reloads all of it and replays the epoch's seeded batch order up to the saved position,
so a run killed after any checkpoint and resumed ends exactly where an uninterrupted run ends.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from cdeq.io import atomic_write_json, load_checkpoint, random_state, restore_random_state, save_checkpoint

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
METRICS = "metrics.json"


@dataclass
class TrainConfig:
    """Settings of :func:`fit`.

    Args:
        steps: optimiser steps in all.
        lr: peak learning rate (after ``warmup`` linear steps, then cosine decay to
            ``lr * min_lr_ratio`` at ``steps``).
        weight_decay: AdamW's decoupled weight decay.
        grad_clip: clip the global gradient norm to this (None: no clipping).
        checkpoint_every: steps between checkpoints.
        eval_every: steps between validation evaluations (0: only at the end).
        log_every: steps between history entries (the running mean of the loss terms).
        seed: seeds the model's RNG stream (dropout, penalties) and the batch order.
    """

    steps: int
    lr: float
    weight_decay: float = 0.0
    warmup: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: Optional[float] = 1.0
    checkpoint_every: int = 100
    eval_every: int = 0
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        if self.warmup < 0 or self.eval_every < 0:
            raise ValueError(f"warmup/eval_every: expected >= 0, got {self.warmup}/{self.eval_every}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive learning rate, got {self.lr!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio: expected a value in [0, 1], got {self.min_lr_ratio!r}")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The schedule's multiplier of ``cfg.lr`` at ``step``: linear warm-up, then cosine decay."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


LossFn = Callable[[nn.Module, Any], tuple[Tensor, dict[str, float]]]
BatchStream = Callable[[int], Iterable[Any]]
Evaluate = Callable[[nn.Module], dict[str, float]]


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    batches: BatchStream,
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    evaluate: Optional[Evaluate] = None,
    select: Optional[str] = None,
    maximize: bool = True,
    after_step: Optional[Callable[[], None]] = None,
    resume: bool = True,
    device: str | torch.device = "cpu",
    name: str = "train",
    meta: Optional[dict[str, Any]] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``model`` and return the metrics that also go to ``run_dir/metrics.json``.

    Args:
        loss_fn: ``(model, batch) -> (loss, logs)``; ``logs`` maps names to floats that are
            averaged into the history (e.g. the solver's NFE and residual).
        batches: ``epoch -> iterable of batches``, the same order for the same epoch (seed it
            with ``cfg.seed`` and the epoch); an epoch may be a single batch (a whole graph).
        evaluate: ``model -> {name: value}`` on validation data, run every ``cfg.eval_every``
            steps and at the end (the model is in eval mode and under no_grad meanwhile).
        select: the key of ``evaluate``'s result to select the best model by: ``best.pt`` keeps
            its best weights and they are loaded into ``model`` at the end.
        after_step: called after every optimiser step (e.g. a projection onto a constraint set).
        resume: continue from ``run_dir/checkpoint.pt`` if it exists (else start afresh).
        meta: extra JSON-able facts stored in the checkpoint and metrics (e.g. the model config).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if select is not None and evaluate is None:
        raise ValueError("select: selecting the best model needs an evaluate function")
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    step, epoch, offset, history, best, elapsed = 0, 0, 0, [], None, 0.0
    torch.manual_seed(cfg.seed)
    ckpt_path = run_dir / CHECKPOINT
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        if ckpt["config"] != dataclasses.asdict(cfg):
            raise ValueError(f"resume: {ckpt_path} was written with another TrainConfig "
                             f"({ckpt['config']}); use another run_dir or resume=False")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, epoch, offset = ckpt["step"], ckpt["epoch"], ckpt["offset"]
        history, best, elapsed = ckpt["history"], ckpt["best"], ckpt["elapsed"]
        restore_random_state(ckpt["rng"])

    def checkpoint() -> None:
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch, "offset": offset,
            "rng": random_state(), "config": dataclasses.asdict(cfg), "history": history,
            "best": best, "elapsed": elapsed + time.time() - t_start, "meta": meta or {}})

    def run_eval() -> dict[str, float]:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            result = evaluate(model)
        model.train(was_training)
        return result

    t_start = time.time()
    sums: dict[str, float] = {}
    count = 0
    bar = tqdm(total=cfg.steps, initial=step, desc=name, disable=not progress, mininterval=5.0)
    model.train()
    while step < cfg.steps:
        it = iter(batches(epoch))
        for _ in range(offset):  # replay the epoch's seeded order up to where a resumed run was
            next(it)
        for batch in it:
            loss, logs = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{name}: non-finite loss {float(loss)} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            if after_step is not None:
                after_step()
            step, offset, count = step + 1, offset + 1, count + 1
            for key, value in {"loss": float(loss.detach()), **logs}.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                entry = {"step": step, "lr": scheduler.get_last_lr()[0], **{k: v / count for k, v in sums.items()}}
                history.append(entry)
                bar.set_postfix(loss=f"{entry['loss']:.4f}")
                sums, count = {}, 0
            if evaluate is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                result = run_eval()
                history.append({"step": step, **{f"val_{k}": v for k, v in result.items()}})
                best = _keep_best(model, run_dir, result, select, maximize, best, step)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint()
            if step >= cfg.steps:
                break
        else:
            epoch, offset = epoch + 1, 0
    bar.close()
    final = run_eval() if evaluate is not None else {}
    if final:
        history.append({"step": step, **{f"val_{k}": v for k, v in final.items()}})
        best = _keep_best(model, run_dir, final, select, maximize, best, step)
    if select is not None and (run_dir / BEST).exists():
        model.load_state_dict(load_checkpoint(run_dir / BEST, map_location=device)["model"])
    wall = elapsed + time.time() - t_start
    metrics = {"name": name, "steps": step, "config": dataclasses.asdict(cfg), "final_val": final,
               "best": best, "wall_s": round(wall, 1), "meta": meta or {}, "history": history}
    atomic_write_json(run_dir / METRICS, metrics)
    last = next((h for h in reversed(history) if "loss" in h), {})
    summary = " ".join(f"{k}={v:.4g}" for k, v in final.items())
    print(f"[{name}] {step} steps in {wall:.0f}s, last loss {last.get('loss', float('nan')):.4f}; "
          f"val: {summary or '-'}; best {best}; -> {run_dir}", flush=True)
    return metrics


def _keep_best(model: nn.Module, run_dir: Path, result: dict[str, float], select: Optional[str],
               maximize: bool, best: Optional[dict[str, float]], step: int) -> Optional[dict[str, float]]:
    """Save the model to ``best.pt`` when ``result[select]`` beats ``best``; return the new best."""
    if select is None:
        return best
    if select not in result:
        raise KeyError(f"select: {select!r} is not among the evaluation's keys {sorted(result)}")
    value = float(result[select])
    if best is None or (value > best["value"] if maximize else value < best["value"]):
        save_checkpoint(run_dir / BEST, {"model": model.state_dict(), "step": step, "value": value})
        return {"step": step, "value": value}
    return best
