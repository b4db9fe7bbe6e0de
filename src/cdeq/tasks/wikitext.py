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
# cpu: the Gutenberg cpu model with the adaptive softmax, 2500 steps (1.2 epochs), sized to train in
# under an hour on one thread (docs/decisions.md has the measured run).
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
        gives) on ``split`` (:meth:`score`); the target count and the segment convention go to
        ``self.last_evaluation``."""
        value = super().evaluate(predict, split, batch_size, limit, **options)
        seq_len = options.get("seq_len") or self.recipe()["seq_len"]
        self.last_evaluation = {
            "split": split, "perplexity": value, "targets": self.last_targets, "seq_len": seq_len,
            "whole_split": self.last_targets == len(self.streams[split]) - 1,
            "convention": f"non-overlapping segments of {seq_len} tokens, every target predicted once, "
                          f"no memory across segments",
        }
        return value

    def score(self, output: Tensor, y: Tensor) -> tuple[int, int, float]:
        """The targets' log-probabilities read off, never renormalised, since the full-vocabulary
        tensor is what costs here."""
        log_probs, keep = output.to(y.device), y != IGNORE
        picked = log_probs.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return int(keep.sum()), 0, -float(picked[keep].double().sum())

    def state_score(self, model: DEQTransformer, z: Tensor, y: Tensor) -> tuple[int, int, float]:
        """The targets' NLL through the adaptive softmax's own loss, which computes only the clusters
        the targets fall in (the full log-probabilities cost about ten times as much)."""
        count = int((y != IGNORE).sum())
        return count, 0, float(model.lm_loss(z, y.to(z.device)).double()) * count

    def readout_loss(self, model: DEQTransformer, z: Tensor, y: Tensor) -> Tensor:
        """The adaptive softmax's own loss, in place of the loss of the full log-probabilities."""
        return model.lm_loss(z, y)

    def explicit_step(self, model: nn.Module, batch: Batch, recipe: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """The explicit baseline's adaptive-softmax loss on ``batch``."""
        x, y = batch
        return model.lm_loss(x, y), {}
