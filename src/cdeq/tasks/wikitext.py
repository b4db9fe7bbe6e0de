"""Word-level language modelling on WikiText-2 (Merity et al. 2016; CC BY-SA 3.0), the small member
of the C-DEQ paper's WikiText-103 benchmark family, with its 33,278-word vocabulary.

Models: the DEQ transformer (Eq. 21) and an explicit one-block transformer of the same size, both
with tied adaptive input and output (:class:`cdeq.models.transformer.AdaptiveIO`, cut-offs
:data:`cdeq.models.transformer.WIKITEXT2_CUTOFFS`), so the 33k-word head does not dominate the
CPU time. Training uses the adaptive softmax's own loss (:meth:`lm_loss`); ``readout`` gives
log-probabilities over the whole vocabulary for evaluation and distillation.

Perplexity convention: each split's token stream (one ``<eos>`` per line) is cut into
non-overlapping segments of ``seq_len`` inputs and their next-token targets; the last segment is
padded with ignored targets, so every token but the first is predicted exactly once (245,568
targets on the test split). A segment sees no earlier segment (no recurrence memory), so a target
has between 0 and ``seq_len - 1`` words of context: the figure is the perplexity of a model with a
fixed window of ``seq_len`` words, higher than that of models that carry memory across segments.
:meth:`WikiTextTask.evaluate` records the convention and the target count in ``last_evaluation``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from cdeq.models.transformer import WIKITEXT2_CUTOFFS, AdaptiveTransformer, DEQTransformer
from cdeq.tasks.base import IGNORE, Batch, Task
from cdeq.tasks.text import TextTask

_CUTOFFS = list(WIKITEXT2_CUTOFFS)
_DEQ = {"f_solver": "anderson", "f_max_iter": 30, "f_tol": 1e-3, "eval_max_iter": 30,
        "backward": "phantom", "phantom_steps": 3, "tau": 0.8}
# cpu: the Gutenberg cpu model with the adaptive softmax, 2500 steps (1.2 epochs). Measured with
# `python -m cdeq.tasks.train wikitext-2 DIR --preset cpu --threads 1` on the 2-core machine under
# load from other work (commit d51a69d, seed 0): teacher 1745 s of training (0.70 s a step, NFE 9 ->
# 17) and 35 minutes with the whole-test-split evaluation, test perplexity 185.8; the explicit
# model 291 s of training, 179.9.
# tiny: max_len 64 because `cdeq run` builds the task with its default (cpu) preset, so the trajectory
# and evaluation batches are the cpu recipe's 64-token segments.
_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"teacher": {"d_model": 16, "n_heads": 2, "d_ff": 32, "max_len": 64, "cutoffs": _CUTOFFS},
             "deq": {**_DEQ, "f_max_iter": 4, "eval_max_iter": 4, "phantom_steps": 1},
             "train": {"steps": 2, "lr": 1e-3, "checkpoint_every": 1, "log_every": 1},
             "batch_size": 4, "seq_len": 16, "val_batches": 1, "test_batches": 2, "jac_weight": 0.5,
             "explicit": {"d_model": 16, "n_heads": 2, "d_ff": 32, "max_len": 64, "cutoffs": _CUTOFFS}},
    "cpu": {"teacher": {"d_model": 128, "n_heads": 4, "d_ff": 512, "max_len": 64, "weight_norm": False,
                        "cutoffs": _CUTOFFS},
            "deq": _DEQ,
            "train": {"steps": 2500, "lr": 2e-3, "weight_decay": 0.01, "warmup": 200, "checkpoint_every": 250,
                      "log_every": 50},
            "batch_size": 16, "seq_len": 64, "val_batches": 30, "test_batches": None, "jac_weight": 0.2,
            "explicit": {"d_model": 128, "n_heads": 4, "d_ff": 512, "max_len": 64, "cutoffs": _CUTOFFS}},
    "gpu": {"teacher": {"d_model": 256, "n_heads": 8, "d_ff": 1024, "max_len": 128, "weight_norm": False,
                        "dropout": 0.1, "cutoffs": _CUTOFFS},
            "deq": _DEQ,
            "train": {"steps": 20000, "lr": 1e-3, "weight_decay": 0.01, "warmup": 500, "checkpoint_every": 1000,
                      "log_every": 100},
            "batch_size": 32, "seq_len": 128, "val_batches": None, "test_batches": None, "jac_weight": 0.2,
            "explicit": {"d_model": 256, "n_heads": 8, "d_ff": 1024, "max_len": 128, "dropout": 0.1,
                         "cutoffs": _CUTOFFS}},
}


class WikiTextTask(TextTask):
    """WikiText-2 word-level language modelling, perplexity on the whole test split (see the
    module docstring for the segment convention)."""

    PRESETS = _PRESETS

    def __init__(self, name: str = "wikitext-2", preset: str = "cpu", root: Optional[str] = None) -> None:
        Task.__init__(self, preset)  # not TextTask's: its loader takes a vocab_size, wikitext-2 keeps every word
        from cdeq import data

        self.name = name
        self.data = data.load(name, root=root)
        self.vocab_size = len(self.data.vocab)
        self.streams = {"train": self.data.train, "val": self.data.valid, "test": self.data.test}
        self.last_evaluation: dict[str, Any] = {}

    def _teacher(self, **kwargs: Any) -> DEQTransformer:
        return DEQTransformer(vocab_size=self.vocab_size, **kwargs)

    def _explicit(self, **kwargs: Any) -> nn.Module:
        return AdaptiveTransformer(vocab_size=self.vocab_size, **kwargs)

    def segments(self, split: str, seq_len: Optional[int] = None) -> Tensor:
        """The split's stream as ``(S, seq_len + 1)`` rows: row s holds tokens s*L .. s*L + L, its
        inputs the first L and its targets the last L, so the targets of the rows do not overlap;
        the last row is padded with -100, so every token after the first is a target exactly once."""
        self._check_split(split)
        seq_len = seq_len or self.recipe()["seq_len"]
        stream = self.streams[split]
        n = math.ceil((len(stream) - 1) / seq_len)
        if n < 1:
            raise ValueError(f"split: {split!r} has {len(stream)} tokens, too few for one target")
        padded = torch.full((n * seq_len + 1,), IGNORE, dtype=torch.long)
        padded[: len(stream)] = stream
        idx = torch.arange(n).unsqueeze(1) * seq_len + torch.arange(seq_len + 1)
        return padded[idx]

    def batches(self, split: str, batch_size: Optional[int] = None, shuffle: bool = False,
                limit: Optional[int] = None, seed: int = 0, seq_len: Optional[int] = None) -> Iterator[Batch]:
        """Batches of ``(x, y)`` segments; the padding of the last segment is id 0 in ``x`` (after
        every real token, so a causal model's real predictions never see it) and -100 in ``y``."""
        for x, y in super().batches(split, batch_size, shuffle, limit, seed, seq_len):
            yield x.clamp(min=0), y

    def evaluate(self, predict: Callable[[Any], Tensor], split: str = "test", batch_size: Optional[int] = None,
                 limit: Optional[int] = None, **options: Any) -> float:
        """Perplexity of ``predict(x) -> (B, L, V)`` log-probabilities (what the models' readout
        gives) on ``split``: the targets' log-probabilities are read off, never renormalised,
        since the full-vocabulary tensor is what costs here. The target count and the segment
        convention go to ``self.last_evaluation``."""
        total, nll = 0, 0.0
        with torch.no_grad():
            for x, y in self.batches(split, batch_size=batch_size, limit=limit, **options):
                log_probs = predict(x).to(y.device)
                keep = y != IGNORE
                picked = log_probs.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                total, nll = total + int(keep.sum()), nll - float(picked[keep].double().sum())
        if total == 0:
            raise ValueError(f"split: {split!r} has no targets")
        seq_len = options.get("seq_len") or self.recipe()["seq_len"]
        value = math.exp(nll / total)
        self.last_evaluation = {
            "split": split, "perplexity": value, "targets": total, "seq_len": seq_len,
            "whole_split": total == len(self.streams[split]) - 1,
            "convention": f"non-overlapping segments of {seq_len} tokens, every target predicted once, "
                          f"no memory across segments",
        }
        return value

    def teacher_step(self, model: DEQTransformer, batch: Batch, recipe: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """The Gutenberg teacher's step (fixed point, Jacobian penalty) with the adaptive softmax's
        own loss in place of the loss of the full log-probabilities."""
        from cdeq.norm import reset_norm
        from cdeq.regularize import jacobian_penalty

        x, y = batch
        reset_norm(model)
        u = model.inject(x)
        z, info = model.deq(lambda s: model.layer(s, u), model.init_state(u))
        loss = model.lm_loss(z, y)
        logs = {"nfe": float(info.nfe), "rel_residual": float(info.rel_residual.float().mean())}
        jac_weight = float(recipe.get("jac_weight", 0.0))
        if jac_weight > 0:
            z_star = z.detach().requires_grad_()
            penalty = jacobian_penalty(model.layer(z_star, u), z_star)
            loss, logs["jac"] = loss + jac_weight * penalty, float(penalty.detach())
        return loss, logs

    def explicit_step(self, model: nn.Module, batch: Batch, recipe: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """The explicit baseline's adaptive-softmax loss on ``batch``."""
        x, y = batch
        return model.lm_loss(x, y), {}
