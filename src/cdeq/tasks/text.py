"""Word-level language modelling on the Gutenberg selection (train/valid/test split by book).

Each split's token stream is cut into non-overlapping segments of ``seq_len + 1`` tokens:
x = the first ``seq_len`` ids ``(B, L)``, y = the next-token targets ``(B, L)``. Segments are
modelled independently (no recurrence memory across segments), so the perplexity is that of a
fixed context of at most ``seq_len`` words. Teacher: the DEQ transformer (Eq. 21); explicit
baseline: a pre-LN transformer of the same width and parameter count (one block).
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

from cdeq.models import DEQTransformer, Transformer
from cdeq.tasks.base import Batch, Task

_DEQ = {"f_solver": "anderson", "f_max_iter": 30, "f_tol": 1e-3, "eval_max_iter": 30,
        "backward": "phantom", "phantom_steps": 3, "tau": 0.8}
# Recipe choices from an ad hoc screen on the cpu preset (training loss at step 400, same seed and batches; the
# explicit transformer 4.754): weight norm + Jacobian weight 0.5 4.816, no weight norm 4.796, no
# weight norm and no Jacobian penalty 4.782 but NFE rising from 8 to 15; the recipe takes no
# weight norm and a lighter penalty (0.2).
_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"teacher": {"d_model": 16, "n_heads": 2, "d_ff": 32, "max_len": 16},
             "deq": {**_DEQ, "f_max_iter": 4, "eval_max_iter": 4, "phantom_steps": 1},
             "train": {"steps": 2, "lr": 1e-3, "checkpoint_every": 1, "log_every": 1},
             "batch_size": 4, "seq_len": 16, "val_batches": 1, "test_batches": 2, "jac_weight": 0.5,
             "explicit": {"d_model": 16, "n_heads": 2, "d_ff": 32, "max_len": 16}},
    "cpu": {"teacher": {"d_model": 128, "n_heads": 4, "d_ff": 512, "max_len": 64, "weight_norm": False},
            "deq": _DEQ,
            "train": {"steps": 1200, "lr": 2e-3, "weight_decay": 0.01, "warmup": 100, "checkpoint_every": 100,
                      "log_every": 20},
            "batch_size": 16, "seq_len": 64, "val_batches": 30, "jac_weight": 0.2,
            "explicit": {"d_model": 128, "n_heads": 4, "d_ff": 512, "max_len": 64}},
    "gpu": {"teacher": {"d_model": 256, "n_heads": 8, "d_ff": 1024, "max_len": 128, "weight_norm": False},
            "deq": _DEQ,
            "train": {"steps": 20000, "lr": 1e-3, "weight_decay": 0.01, "warmup": 500, "checkpoint_every": 1000,
                      "log_every": 100},
            "batch_size": 32, "seq_len": 128, "val_batches": None, "jac_weight": 0.2,
            "explicit": {"d_model": 256, "n_heads": 8, "d_ff": 1024, "max_len": 128}},
}


class TextTask(Task):
    """Gutenberg word-level language modelling, perplexity on the test books."""

    metric = "perplexity"
    PRESETS = _PRESETS

    def __init__(self, name: str = "gutenberg", preset: str = "cpu", vocab_size: int = 10000,
                 root: Optional[str] = None) -> None:
        super().__init__(preset)
        from cdeq import data

        self.name = name
        self.data = data.load(name, root=root, vocab_size=vocab_size)
        self.vocab_size = len(self.data.vocab)
        self.streams = {"train": self.data.train, "val": self.data.valid, "test": self.data.test}

    def _teacher(self, **kwargs: Any) -> DEQTransformer:
        return DEQTransformer(vocab_size=self.vocab_size, **kwargs)

    def _explicit(self, **kwargs: Any) -> nn.Module:
        return Transformer(vocab_size=self.vocab_size, **kwargs)

    def batch_options(self, recipe: dict[str, Any]) -> dict[str, Any]:
        return {"seq_len": recipe["seq_len"]}

    def segments(self, split: str, seq_len: Optional[int] = None) -> Tensor:
        """The split's token stream as ``(S, seq_len + 1)`` non-overlapping segments (the tail
        that does not fill one is dropped)."""
        self._check_split(split)
        seq_len = seq_len or self.recipe()["seq_len"]
        stream = self.streams[split]
        n = (len(stream) - 1) // seq_len
        if n < 1:
            raise ValueError(f"seq_len: {seq_len} is longer than the {split!r} split ({len(stream)} tokens)")
        idx = torch.arange(n).unsqueeze(1) * seq_len + torch.arange(seq_len + 1)
        return stream[idx]

    def batches(self, split: str, batch_size: Optional[int] = None, shuffle: bool = False,
                limit: Optional[int] = None, seed: int = 0, seq_len: Optional[int] = None) -> Iterator[Batch]:
        """Batches of ``(x, y)`` segments of ``seq_len`` (default: the task preset's); ``limit``
        caps their number."""
        seg = self.segments(split, seq_len)
        batch_size = batch_size or self.recipe()["batch_size"]
        order = torch.arange(len(seg))
        if shuffle:
            order = order[torch.randperm(len(order), generator=torch.Generator().manual_seed(seed))]
        chunks = order.split(batch_size)
        for idx in chunks[:limit] if limit is not None else chunks:
            batch = seg[idx].long()
            yield batch[:, :-1], batch[:, 1:]
