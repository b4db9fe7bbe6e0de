"""One training loop for every trainer in cdeq: teacher, explicit baseline, distillation, HyperDEQ, direct.

:class:`TrainLoop` runs AdamW with a warm-up + cosine learning rate that decays to a floor
(:class:`OptimConfig`), gradient clipping, a progress bar that is quiet when the output is not a
terminal (one summary line per run instead), and atomic checkpoints every ``checkpoint_every``
steps (:func:`cdeq.io.save_checkpoint`, loaded with ``weights_only=True``). Its parts:

- ``model``: the module trained and checkpointed (a teacher, or a loss module such as
  :class:`cdeq.consistency.ConsistencyLoss` that holds the student and its EMA target);
- ``objective``: a module whose ``forward(batch) -> (loss, terms)`` computes one batch's loss (the
  model itself when it is a loss module, else :class:`Objective`); with several ranks it runs under
  ``DistributedDataParallel`` (:func:`cdeq.distributed.wrap`), which averages the gradients;
- ``batches(epoch, offset)``: the seeded batches of an epoch from position ``offset`` on, so a
  resumed run sees exactly the batches the uninterrupted run saw;
- :meth:`TrainLoop.after_step`: the hook subclasses override (the distillation loop's EMA update).

Seeding rule: torch's global stream (dropout) is seeded with ``cfg.seed`` when the loop starts and
restored from the checkpoint on resume (each rank its own), so a run never depends on what its
process did before. The main rank writes into ``run_dir`` (if given): ``checkpoint.pt``, ``best.pt``
(the best validation weights, if ``select`` is given) and ``metrics.json`` at the end; every rank
resumes from them. Logged numbers are averaged over ranks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from cdeq import distributed
from cdeq.config import check_int, check_number
from cdeq.io import (atomic_write_json, load_checkpoint, load_latest_checkpoint, random_state, restore_random_state,
                     save_checkpoint)
from cdeq.precision import AMP_CHOICES, amp_layers

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
METRICS = "metrics.json"

BatchStream = Callable[[int, int], Iterable[Any]]
Evaluate = Callable[[nn.Module], dict[str, float]]


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedule settings of a training run.

    Args:
        steps: optimiser steps in all.
        lr: peak learning rate, reached after ``warmup`` linear steps, then cosine decay to
            ``lr * min_lr_ratio`` (the schedule's floor) at ``steps``.
        weight_decay: AdamW's decoupled weight decay.
        grad_clip: clip the global gradient norm to this (None: no clipping).
        checkpoint_every: steps between checkpoints (and one at the end).
        eval_every: steps between validation evaluations (0: only at the end).
        log_every: steps between history entries (running means of the loss terms).
        seed: seeds the global random stream (dropout) and the batch order.
        amp: "bf16" runs the DEQ layers in the model under bf16 autocast in the training steps
            (:mod:`cdeq.precision`: f alone; the solver, readout and losses stay float32; the
            validation runs in full precision). None: full precision.
    """

    steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: Optional[float] = 1.0
    checkpoint_every: int = 100
    eval_every: int = 0
    log_every: int = 10
    seed: int = 0
    amp: Optional[str] = None

    def __post_init__(self) -> None:
        if self.amp is not None and self.amp not in AMP_CHOICES:
            raise ValueError(f"amp: expected None or one of {AMP_CHOICES}, got {self.amp!r}")
        for name in ("steps", "checkpoint_every", "log_every"):
            check_int(name, getattr(self, name), 1)
        for name in ("warmup", "eval_every", "seed"):
            check_int(name, getattr(self, name), 0)
        check_number("lr", self.lr, 0.0, low_open=True)
        check_number("weight_decay", self.weight_decay, 0.0)
        check_number("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        if self.grad_clip is not None:
            check_number("grad_clip", self.grad_clip, 0.0, low_open=True)


def lr_factor(step: int, cfg: OptimConfig) -> float:
    """The schedule's multiplier of ``cfg.lr`` at ``step``: linear warm-up, then cosine to the floor."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random generator of one training step: the same (seed, step) draws the same batch."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))


def mean_over_ranks(logs: dict[str, float]) -> dict[str, float]:
    """Each logged number averaged over the ranks that logged it (one process: ``logs`` itself)."""
    every = distributed.gather(logs)
    if len(every) == 1:
        return logs
    keys = sorted({k for d in every for k in d})
    return {k: sum(d[k] for d in every if k in d) / sum(1 for d in every if k in d) for k in keys}


def epoch_stream(batches: Callable[[int], Iterable[Any]]) -> BatchStream:
    """A :data:`BatchStream` from ``epoch -> iterable`` whose order cannot skip: resuming replays it."""

    def stream(epoch: int, offset: int) -> Iterator[Any]:
        it = iter(batches(epoch))
        for _ in range(offset):
            next(it)
        return it
    return stream


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM after a checkpoint at a step boundary: rerunning resumes it."""


@contextlib.contextmanager
def stop_requests() -> Any:
    """SIGINT and SIGTERM set a flag (read between steps) instead of stopping mid-step, so the
    checkpoint the loop then writes is the exact state after a whole step."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    old = {sig: signal.signal(sig, lambda *_: flag.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


class Objective(nn.Module):
    """A loss function of a model as a module, ``forward(batch) = fn(model, batch)``, so that the
    whole step runs inside one forward (and under DDP when there are several ranks)."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, Any], tuple[Tensor, dict[str, Any]]]) -> None:
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, batch: Any) -> tuple[Tensor, dict[str, Any]]:
        return self.fn(self.model, batch)


def progress_bar(total: int, initial: int, desc: str, progress: Optional[bool]) -> tqdm:
    """A tqdm bar; ``progress=None`` shows it only when stderr is a terminal."""
    return tqdm(total=total, initial=initial, desc=desc, disable=None if progress is None else not progress,
                mininterval=5.0)


class TrainLoop:
    """Train ``model`` on ``objective`` over ``batches`` for ``cfg.steps`` steps; :meth:`run` returns the metrics.

    Args:
        model: the module trained (its parameters with ``requires_grad``) and checkpointed.
        objective: a module, ``forward(batch) -> (loss, terms)``; ``terms`` are numbers or 0-dim
            tensors averaged into the history. It holds ``model`` (or is it).
        batches: ``(epoch, offset) -> iterable of batches`` (an epoch may be endless).
        cfg: the :class:`OptimConfig`; resuming a checkpoint written with another is an error.
        run_dir: where checkpoints and metrics go (None: nowhere, no resume).
        evaluate: ``model -> {name: value}`` on validation data, every ``cfg.eval_every`` steps and at
            the end, in eval mode and under no_grad; ``select`` names the key that picks ``best.pt``.
        meta: JSON-able facts stored with the checkpoint and the metrics.
        progress: the bar (None: only on a terminal).

    Example:
        >>> model = nn.Linear(2, 1)
        >>> data = [(torch.randn(8, 2), torch.randn(8, 1)) for _ in range(4)]
        >>> objective = Objective(model, lambda m, b: (nn.functional.mse_loss(m(b[0]), b[1]), {}))
        >>> loop = TrainLoop(model, objective, epoch_stream(lambda e: data), OptimConfig(steps=8), progress=False)
        >>> loop.run()["steps"]  # doctest: +ELLIPSIS
        [train] 8 steps in ...
        8
    """

    def __init__(self, model: nn.Module, objective: nn.Module, batches: BatchStream, cfg: OptimConfig,
                 run_dir: Optional[str | Path] = None, *, name: str = "train", evaluate: Optional[Evaluate] = None,
                 select: Optional[str] = None, maximize: bool = True, meta: Optional[dict[str, Any]] = None,
                 progress: Optional[bool] = None) -> None:
        if not isinstance(cfg, OptimConfig):
            raise TypeError(f"cfg: expected an OptimConfig, got {type(cfg).__name__}")
        if select is not None and evaluate is None:
            raise ValueError("select: selecting the best model needs an evaluate function")
        self.model, self.objective, self.batches, self.cfg = model, objective, batches, cfg
        self.step_module = objective
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.name, self.evaluate, self.select, self.maximize = name, evaluate, select, maximize
        self.meta, self.progress = meta or {}, progress
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"{name}: the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step = self.epoch = self.offset = 0
        self.history: list[dict[str, Any]] = []
        self.window: dict[str, Any] = {"sums": {}, "count": 0}  # the loss terms since the last history entry
        self.best: Optional[dict[str, float]] = None
        self.elapsed = 0.0

    def after_step(self) -> None:
        """Called after every optimiser step; subclasses add work here (an EMA update, a projection)."""

    # -- checkpoints -------------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.cfg), "loop": type(self).__name__}

    def _checkpoint_path(self) -> Optional[Path]:
        return None if self.run_dir is None else self.run_dir / CHECKPOINT

    def resume(self) -> None:
        """Load ``run_dir/checkpoint.pt`` if there is one (the previous one if it is damaged): weights,
        optimiser, position, history, random state."""
        path = self._checkpoint_path()
        ckpt = None if path is None else load_latest_checkpoint(path)
        if ckpt is None:
            return
        if ckpt["config"] != self._config():
            raise ValueError(f"resume: {path} was written with other settings ({ckpt['config']}); "
                             "use another run directory or delete it")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step, self.epoch, self.offset = ckpt["step"], ckpt["epoch"], ckpt["offset"]
        self.history, self.best, self.elapsed = ckpt["history"], ckpt["best"], ckpt["elapsed"]
        self.window = ckpt.get("log_window", {"sums": {}, "count": 0})  # older checkpoints: the window restarts
        ranks = ckpt.get("rng_ranks")
        restore_random_state(ranks[distributed.rank()] if ranks and len(ranks) == distributed.world_size()
                             else ckpt["rng"])

    def save(self, started: float) -> None:
        path = self._checkpoint_path()
        if path is None:
            return
        ranks = distributed.gather(random_state())  # a collective: every rank takes part
        if distributed.is_main():
            save_checkpoint(path, keep_previous=True, state={
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "epoch": self.epoch, "offset": self.offset, "rng": ranks[0], "config": self._config(),
                "history": self.history, "best": self.best, "elapsed": self.elapsed + time.time() - started,
                "log_window": self.window, "meta": self.meta, **({"rng_ranks": ranks} if len(ranks) > 1 else {})})

    # -- one step ----------------------------------------------------------------------------------
    def train_step(self, batch: Any) -> dict[str, float]:
        """One optimiser step on ``batch``; returns the logged numbers."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr * lr_factor(self.step, self.cfg)
        with amp_layers(self.model, self.cfg.amp):
            loss, terms = self.step_module(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.name}: non-finite loss {float(loss)} at step {self.step}; lower the lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        logs = {k: float(v) for k, v in terms.items()}
        if self.cfg.grad_clip is not None:
            logs["grad_norm"] = float(nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip))
        self.optimizer.step()
        self.after_step()
        return {"loss": float(loss.detach()), **logs}

    def validate(self) -> dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            result = self.evaluate(self.model)
        self.model.train(was_training)
        self.history.append({"step": self.step, **{f"val_{k}": v for k, v in result.items()}})
        self._keep_best(result)
        return result

    def _keep_best(self, result: dict[str, float]) -> None:
        """Save the weights to ``best.pt`` when ``result[select]`` beats the best so far."""
        if self.select is None or self.run_dir is None:
            return
        if self.select not in result:
            raise KeyError(f"select: {self.select!r} is not among the evaluation's keys {sorted(result)}")
        value = float(result[self.select])
        if self.best is None or (value > self.best["value"] if self.maximize else value < self.best["value"]):
            if distributed.is_main():
                save_checkpoint(self.run_dir / BEST, {"model": self.model.state_dict(), "step": self.step,
                                                      "value": value})
            self.best = {"step": self.step, "value": value}

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train (resuming from ``run_dir`` if a checkpoint is there) and return the metrics."""
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(self.cfg.seed)
        self.resume()
        self.step_module = distributed.wrap(self.objective)
        started = time.time()
        bar = progress_bar(self.cfg.steps, self.step, self.name, self.progress and distributed.is_main())
        self.objective.train()
        with stop_requests() as stop:
            self._loop(bar, started, stop)
        bar.close()
        return self._finish(started)

    def _loop(self, bar: tqdm, started: float, stop: threading.Event) -> None:
        while self.step < self.cfg.steps:
            for batch in self.batches(self.epoch, self.offset):
                logs = self.train_step(batch)
                self.step, self.offset = self.step + 1, self.offset + 1
                sums = self.window["sums"]
                for key, value in logs.items():
                    sums[key] = sums.get(key, 0.0) + value
                self.window["count"] += 1
                bar.update(1)
                if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                    count = self.window["count"]
                    self.history.append({"step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
                                         **mean_over_ranks({k: v / count for k, v in sums.items()})})
                    bar.set_postfix(loss=f"{self.history[-1]['loss']:.4g}")
                    self.window = {"sums": {}, "count": 0}
                if self.evaluate is not None and self.cfg.eval_every and self.step % self.cfg.eval_every == 0 \
                        and self.step < self.cfg.steps:
                    self.validate()
                stopping = distributed.sum_all([stop.is_set()])[0] > 0  # every rank stops at the same step
                if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps or stopping:
                    self.save(started)
                if stopping:
                    where = (f"; its checkpoint is in {self.run_dir}, from which the same training resumes"
                             if self.run_dir is not None else " (no run_dir: nothing was saved)")
                    raise Interrupted(f"{self.name}: stopped at step {self.step}{where}")
                if self.step >= self.cfg.steps:
                    break
            else:
                self.epoch, self.offset = self.epoch + 1, 0

    def _finish(self, started: float) -> dict[str, Any]:
        final = self.validate() if self.evaluate is not None else {}
        distributed.barrier()  # best.pt and the last checkpoint are on disk before any rank reads them
        if self.select is not None and self.run_dir is not None and (self.run_dir / BEST).exists():
            self.model.load_state_dict(load_checkpoint(self.run_dir / BEST)["model"])
        wall = self.elapsed + time.time() - started
        metrics = {"name": self.name, "steps": self.step, "config": self._config(), "final_val": final,
                   "best": self.best, "wall_s": round(wall, 1), "meta": self.meta, "history": self.history}
        if self.run_dir is not None and distributed.is_main():
            atomic_write_json(self.run_dir / METRICS, metrics)
        last = next((h for h in reversed(self.history) if "loss" in h), {})
        summary = " ".join(f"{k}={v:.4g}" for k, v in final.items())
        loss = last.get("loss", float("nan"))
        distributed.print0(f"[{self.name}] {self.step} steps in {wall:.0f}s, last loss {loss:.4g}"
              f"{'; val: ' + summary if summary else ''}{f'; best {self.best}' if self.best else ''}", flush=True)
        return metrics
