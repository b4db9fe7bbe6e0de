"""The Task base class: data, model builders, metric and the training recipes of one benchmark.

A subclass provides the data (:meth:`Task._split`, :meth:`Task.batches`), the two model
builders' constructor arguments and ``PRESETS``: per preset (``"tiny"`` for tests and smoke runs,
``"cpu"`` for a 2-core machine, ``"gpu"``) a recipe dict with

- ``teacher``: the DEQ model's constructor arguments; ``deq``: the :class:`cdeq.DEQ` options;
- ``train``: :class:`cdeq.training.OptimConfig` arguments; ``batch_size``;
- ``jac_weight``: the weight of the Jacobian penalty (Eq. 17-18; 0 turns it off);
- ``explicit``: the explicit baseline's constructor arguments; ``explicit_train``: its config.

Labels that do not count are -100 (the ignore index) throughout.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdeq.io import atomic_write_json, load_checkpoint
from cdeq.state import to_device
from cdeq.models import DEQModel, num_parameters
from cdeq import distributed
from cdeq.training import BEST, CHECKPOINT, METRICS, Objective, OptimConfig, TrainLoop, epoch_stream

IGNORE = -100
Batch = tuple[Any, Tensor]


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with ``overrides`` applied (nested dicts are merged key by key)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class Task:
    """One benchmark. Subclasses set ``name``, ``metric``, ``PRESETS``, ``splits`` and implement
    :meth:`batches`, :meth:`_teacher` and :meth:`_explicit`."""

    name: str = ""
    metric: str = "accuracy"
    splits: tuple[str, ...] = ("train", "val", "test")
    PRESETS: dict[str, dict[str, Any]] = {}

    def __init__(self, preset: str = "cpu") -> None:
        self.preset = self._check_preset(preset)

    # ----------------------------------------------------------------- recipes and models
    def _check_preset(self, preset: str) -> str:
        if preset not in self.PRESETS:
            raise ValueError(f"preset: unknown preset {preset!r} for task {self.name!r}; "
                             f"available: {sorted(self.PRESETS)}")
        return preset

    def recipe(self, preset: Optional[str] = None, **overrides: Any) -> dict[str, Any]:
        """The recipe of ``preset`` (default: the task's) with nested ``overrides`` merged in."""
        return merged(self.PRESETS[self._check_preset(preset or self.preset)], overrides)

    def _teacher(self, **kwargs: Any) -> DEQModel:
        raise NotImplementedError

    def _explicit(self, **kwargs: Any) -> nn.Module:
        raise NotImplementedError

    def build_teacher(self, preset: Optional[str] = None, deq: Optional[dict[str, Any]] = None,
                      **overrides: Any) -> DEQModel:
        """The DEQ model of ``preset`` (constructor ``overrides`` applied) with its ``deq`` set
        (``deq`` overrides the recipe's :class:`cdeq.DEQ` options)."""
        from cdeq.deq import DEQ

        recipe = self.recipe(preset)
        model = self._teacher(**{**recipe["teacher"], **overrides})
        return model.set_deq(DEQ(**{**recipe["deq"], **(deq or {})}))

    def build_explicit(self, preset: Optional[str] = None, **overrides: Any) -> nn.Module:
        """The explicit baseline of ``preset`` (about the teacher's parameter count)."""
        return self._explicit(**{**self.recipe(preset)["explicit"], **overrides})

    # ----------------------------------------------------------------- data, loss, metric
    def batches(self, split: str, batch_size: Optional[int] = None, shuffle: bool = False,
                limit: Optional[int] = None, seed: int = 0) -> Iterator[Batch]:
        """Yield ``(x, y)`` batches of ``split``; ``limit`` caps the number of batches;
        ``shuffle`` orders them by a generator seeded with ``seed``."""
        raise NotImplementedError

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"split: expected one of {self.splits}, got {split!r}")

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """Mean cross-entropy over the labels that count (``y != -100``)."""
        if logits.shape[:-1] != y.shape:
            raise ValueError(f"y: expected shape {tuple(logits.shape[:-1])} (the logits' without the class "
                             f"dimension), got {tuple(y.shape)}")
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), ignore_index=IGNORE)

    def evaluate(self, predict: Callable[[Any], Any], split: str = "test", batch_size: Optional[int] = None,
                 limit: Optional[int] = None, score: Optional[Callable[[Any, Tensor], tuple[int, int, float]]] = None,
                 **options: Any) -> float:
        """The metric of ``predict(x) -> logits`` on ``split``: accuracy in [0, 1] or perplexity.
        ``limit`` caps the number of batches; ``score(output, y)`` (default :meth:`score`) turns
        ``predict``'s output into (targets, hits, summed NLL); ``options`` go to :meth:`batches`. With several ranks
        each evaluates every world-th batch and the counts, hits and summed NLL are added over ranks
        (not a mean of means), so the figure is the one-process figure."""
        return self.evaluate_each(lambda x: [predict(x)], 1, split, batch_size, limit, score, **options)[0]

    def evaluate_each(self, predict: Callable[[Any], Sequence[Any]], count: int, split: str = "test",
                      batch_size: Optional[int] = None, limit: Optional[int] = None,
                      score: Optional[Callable[[Any, Tensor], tuple[int, int, float]]] = None,
                      **options: Any) -> list[float]:
        """:meth:`evaluate` of ``count`` outputs per batch in one pass over ``split``: ``predict(x)``
        returns a sequence of them (e.g. one state per budget of a solve), each scored on its own;
        returns their metrics in order."""
        sums = [[0, 0, 0.0] for _ in range(count)]
        r, w = distributed.rank(), distributed.world_size()
        with torch.no_grad():
            for i, (x, y) in enumerate(self.batches(split, batch_size=batch_size, limit=limit, **options)):
                if i % w != r:
                    continue
                outputs = predict(x)
                if len(outputs) != count:
                    raise ValueError(f"predict: expected {count} outputs per batch, got {len(outputs)}")
                for acc, out in zip(sums, outputs):
                    for j, v in enumerate((score or self.score)(out, y)):
                        acc[j] += v
        flat = distributed.sum_all([v for acc in sums for v in acc])
        totals = [flat[3 * i:3 * i + 3] for i in range(count)]
        if any(total == 0 for total, _, _ in totals):
            raise ValueError(f"split: {split!r} has no labelled targets")
        self.last_targets = int(totals[0][0])
        return [hits / total if self.metric == "accuracy" else math.exp(nll / total) for total, hits, nll in totals]

    def score(self, output: Tensor, y: Tensor) -> tuple[int, int, float]:
        """One batch's (labelled targets, correct answers, summed NLL) from ``predict``'s logits."""
        logits, keep = output.to(y.device), y != IGNORE
        if self.metric == "accuracy":
            return int(keep.sum()), int((logits.argmax(-1) == y)[keep].sum()), 0.0
        return int(keep.sum()), 0, float(F.cross_entropy(logits[keep].float(), y[keep], reduction="sum"))

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"

    # ----------------------------------------------------------------- training
    def teacher_step(self, model: DEQModel, batch: Batch, recipe: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """The teacher's training loss on ``batch``: the task loss at the DEQ's fixed point plus
        ``recipe["jac_weight"]`` times the Jacobian penalty there (Eq. 17-18); logs NFE and residual."""
        from cdeq.norm import reset_norm

        x, y = batch
        reset_norm(model)
        u = model.inject(x)
        z, info = model.deq(lambda s: model.layer(s, u), model.init_state(u))
        loss = self.readout_loss(model, z, y)
        logs = {"nfe": float(info.nfe), "rel_residual": float(info.rel_residual.float().mean())}
        jac_weight = float(recipe.get("jac_weight", 0.0))
        if jac_weight > 0:
            from cdeq.regularize import jacobian_penalty
            from cdeq.state import map_state

            z_star = map_state(lambda t: t.detach().requires_grad_(), z)
            penalty = jacobian_penalty(model.layer(z_star, u), z_star)
            loss = loss + jac_weight * penalty
            logs["jac"] = float(penalty.detach())
        return loss, logs

    def state_score(self, model: DEQModel, z: Any, y: Tensor) -> tuple[int, int, float]:
        """:meth:`score` of the teacher's readout at the states ``z`` (a task whose readout costs more
        than its loss overrides it)."""
        return self.score(model.readout(z), y)

    def readout_loss(self, model: DEQModel, z: Any, y: Tensor) -> Tensor:
        """The task loss of the teacher's readout at the state ``z`` (a task with a cheaper loss than
        that of the readout's logits overrides it)."""
        return self.loss(model.readout(z), y)

    def explicit_step(self, model: nn.Module, batch: Batch, recipe: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """The explicit baseline's training loss on ``batch``."""
        x, y = batch
        return self.loss(model(x), y), {}

    def batch_options(self, recipe: dict[str, Any]) -> dict[str, Any]:
        """Options of :meth:`batches` that a recipe fixes (e.g. the text segment length)."""
        return {}

    def _select_key(self) -> Optional[str]:
        """The validation metric the training loop keeps the best model by (None: last)."""
        return None

    def _fit(self, kind: str, model: nn.Module, step: Callable[..., tuple[Tensor, dict[str, float]]],
             recipe: dict[str, Any], train_cfg: dict[str, Any], run_dir: str | Path, seed: int,
             device: str, progress: Optional[bool], meta: dict[str, Any]) -> dict[str, Any]:
        cfg = OptimConfig(**{**train_cfg, "seed": seed})
        batch_size, opts = recipe["batch_size"], self.batch_options(recipe)

        def stream(epoch: int) -> Iterator[Batch]:
            for x, y in self.batches("train", batch_size=batch_size, shuffle=True, seed=seed * 100003 + epoch, **opts):
                x, y = distributed.local_batch(x, y)
                yield to_device(x, device), y.to(device)

        def validate(m: nn.Module) -> dict[str, float]:
            return {self.metric: self.evaluate(lambda x: _logits(m, to_device(x, device)), "val", batch_size=batch_size,
                                               limit=recipe.get("val_batches"), **opts)}

        torch.manual_seed(seed)
        meta = {**meta, "task": self.name, "kind": kind, "model": type(model).__name__, "params": num_parameters(model)}
        loop_class = ProjectedLoop if callable(getattr(model, "project_", None)) else TrainLoop
        objective = Objective(model.to(device), lambda m, b: step(m, b, recipe))
        loop = loop_class(model, objective, epoch_stream(stream), cfg, run_dir,
                          name=f"{self.name}/{kind}", evaluate=validate, select=self._select_key(),
                          maximize=self.higher_is_better, meta=meta, progress=progress)
        metrics = loop.run()
        model.eval()
        metrics["test"] = {self.metric: self.evaluate(lambda x: _logits(model, to_device(x, device)), "test",
                                                      batch_size=batch_size, limit=recipe.get("test_batches"), **opts)}
        if distributed.is_main():
            atomic_write_json(Path(run_dir) / METRICS, metrics)
        distributed.print0(f"[{self.name}/{kind}] test {self.metric} {metrics['test'][self.metric]:.4f}", flush=True)
        return metrics

    def train_teacher(self, run_dir: str | Path, preset: str = "cpu", seed: int = 0, device: str = "cpu",
                      progress: Optional[bool] = None, command: Optional[str] = None,
                      **overrides: Any) -> dict[str, Any]:
        """Train the DEQ teacher of ``preset`` in ``run_dir`` (resumable; see :class:`cdeq.training.TrainLoop`).
        ``overrides`` are merged into the recipe; ``command`` (the command line, if any) is recorded.
        Returns the metrics (``metrics["test"]`` too)."""
        recipe = self.recipe(preset, **overrides)
        torch.manual_seed(seed)
        model = self._teacher(**recipe["teacher"])
        from cdeq.deq import DEQ

        model.set_deq(DEQ(**recipe["deq"]))
        meta = {"preset": preset, "overrides": overrides, "recipe": recipe, "seed": seed, "command": command}
        return self._fit("teacher", model, self.teacher_step, recipe, recipe["train"],
                         run_dir, seed, device, progress, meta)

    def train_explicit(self, run_dir: str | Path, preset: str = "cpu", seed: int = 0, device: str = "cpu",
                       progress: Optional[bool] = None, command: Optional[str] = None,
                       **overrides: Any) -> dict[str, Any]:
        """Train the explicit baseline of ``preset`` in ``run_dir``, like :meth:`train_teacher`."""
        recipe = self.recipe(preset, **overrides)
        torch.manual_seed(seed)
        model = self._explicit(**recipe["explicit"])
        meta = {"preset": preset, "overrides": overrides, "recipe": recipe, "seed": seed, "command": command}
        train_cfg = recipe.get("explicit_train", recipe["train"])
        return self._fit("explicit", model, self.explicit_step, recipe, train_cfg, run_dir, seed, device,
                         progress, meta)

    def load_teacher(self, run_dir: str | Path, device: str = "cpu") -> DEQModel:
        """The teacher trained in ``run_dir`` (its best weights if selected, else the last), in eval mode."""
        run_dir = Path(run_dir)
        ckpt_path = run_dir / CHECKPOINT
        if not ckpt_path.exists():
            raise FileNotFoundError(f"run_dir: no {CHECKPOINT} in {run_dir}; train the teacher first")
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        meta = ckpt["meta"]
        if meta.get("kind") != "teacher" or meta.get("task") != self.name:
            raise ValueError(f"run_dir: {run_dir} holds a {meta.get('task')}/{meta.get('kind')} run, "
                             f"not a {self.name} teacher")
        recipe = meta["recipe"]
        model = self._teacher(**recipe["teacher"])
        from cdeq.deq import DEQ

        model.set_deq(DEQ(**recipe["deq"]))
        state = load_checkpoint(run_dir / BEST, map_location=device)["model"] if (run_dir / BEST).exists() else ckpt["model"]
        model.load_state_dict(state)
        return model.to(device).eval()


class ProjectedLoop(TrainLoop):
    """The training loop of a model with a constraint set: ``model.project_()`` after every step."""

    def after_step(self) -> None:
        self.model.project_()


def _logits(model: nn.Module, x: Any) -> Tensor:
    """Logits of a DEQ model (whose forward returns ``(logits, info)``) or of a plain one."""
    out = model(x)
    return out[0] if isinstance(out, tuple) else out
