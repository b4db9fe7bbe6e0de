"""WikiText-2 (Merity et al. 2016, CC BY-SA 3.0), word level, in the layout of pytorch/examples'
``word_language_model``: ``train.txt``, ``valid.txt``, ``test.txt``.

The usual reading: every line is split on whitespace and ends with ``<eos>`` (an empty line is a
lone ``<eos>``), giving 2,088,628 / 217,646 / 245,569 tokens. The vocabulary is built from the
training split alone: ``<unk>``, ``<eos>``, then the other words by falling frequency (ties
alphabetical), 33,278 in all. Frequency order is what an adaptive softmax's cut-offs need (the
head holds the most frequent ids). Words of valid/test that training lacks map to ``<unk>`` with a
warning that counts them; the released corpus has none (its rare words are already ``<unk>``).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from cdeq.data.sources import cache_root, cached_dataclass, find_file, read_file
from cdeq.data.text import EOS, UNK, TextData, build_vocab

READER_VERSION = 1
SPLIT_FILES = {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"}


def tokenize_lines(text: str) -> list[str]:
    """Whitespace tokens of every ``\n``-ended line (a last line without one counts too), each
    line followed by ``<eos>``."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    tokens: list[str] = []
    for line in lines:
        tokens.extend(line.split())
        tokens.append(EOS)
    return tokens


def encode_counting(tokens: list[str], vocab: list[str]) -> tuple[torch.Tensor, int]:
    """Token ids (unknown words as ``<unk>``, id 0) and the number of unknown tokens."""
    index = {word: i for i, word in enumerate(vocab)}
    unk = index[UNK]
    ids = [index.get(t, -1) for t in tokens]
    unknown = sum(1 for i in ids if i < 0)
    return torch.tensor([unk if i < 0 else i for i in ids], dtype=torch.long), unknown


def read_wikitext2(folder: Path) -> TextData:
    """The three splits of ``folder`` as token ids (cached in the data cache after the first read)."""
    cached = cache_root() / "wikitext-2" / f"tokens-v{READER_VERSION}.pt"
    return cached_dataclass(cached, TextData, lambda: _read_splits(Path(folder)))


def _read_splits(folder: Path) -> TextData:
    tokens: dict[str, list[str]] = {}
    for split, fname in SPLIT_FILES.items():
        path = find_file(folder, fname)
        if path is None:
            raise FileNotFoundError(f"{folder}: missing WikiText-2 file {fname}")
        tokens[split] = tokenize_lines(read_file(path).decode("utf-8"))
    vocab = build_vocab(tokens["train"], vocab_size=len(set(tokens["train"]) | {UNK, EOS}))
    ids: dict[str, torch.Tensor] = {}
    for split, toks in tokens.items():
        ids[split], unknown = encode_counting(toks, vocab)
        if unknown:
            warnings.warn(f"wikitext-2 {split}: {unknown} of {len(toks)} tokens are not in the training "
                          f"vocabulary and were mapped to {UNK}", stacklevel=3)
    return TextData(train=ids["train"], valid=ids["valid"], test=ids["test"], vocab=vocab,
                    books={split: [fname] for split, fname in SPLIT_FILES.items()}, name="wikitext-2")
