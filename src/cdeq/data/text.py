"""Word-level language-modelling corpora: the NLTK Gutenberg selection (18 books).

Tokenizer (version ``TOKENIZER_VERSION``): each book is read as latin-1 and cut into paragraphs
at blank lines; a paragraph's lines are joined, lower-cased and split into words (``\\w+`` with
inner apostrophes kept: ``don't``) and single punctuation characters; every paragraph ends with
``<eos>``. The vocabulary is ``<unk>``, ``<eos>`` and then the most frequent words of the training
books (ties broken alphabetically) up to ``vocab_size`` entries in all; other words map to
``<unk>``.

Split by book (about 5 % of the tokens each for validation and test; the rest train):
- valid: ``austen-persuasion.txt``, ``shakespeare-caesar.txt``
- test: ``chesterton-ball.txt``, ``shakespeare-macbeth.txt``
Other books by the same authors stay in training, so the held-out vocabulary is shared.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from cdeq.data.sources import cache_root, cached_dataclass, find_file, read_file

TOKENIZER_VERSION = 1
UNK, EOS = "<unk>", "<eos>"
GUTENBERG_BOOKS = (
    "austen-emma.txt", "austen-persuasion.txt", "austen-sense.txt", "bible-kjv.txt",
    "blake-poems.txt", "bryant-stories.txt", "burgess-busterbrown.txt", "carroll-alice.txt",
    "chesterton-ball.txt", "chesterton-brown.txt", "chesterton-thursday.txt",
    "edgeworth-parents.txt", "melville-moby_dick.txt", "milton-paradise.txt",
    "shakespeare-caesar.txt", "shakespeare-hamlet.txt", "shakespeare-macbeth.txt",
    "whitman-leaves.txt",
)  # fmt: skip
VALID_BOOKS = ("austen-persuasion.txt", "shakespeare-caesar.txt")
TEST_BOOKS = ("chesterton-ball.txt", "shakespeare-macbeth.txt")
_TOKEN = re.compile(r"\w+(?:'\w+)*|[^\w\s]")
_PARAGRAPH = re.compile(r"\n\s*\n")


@dataclass(repr=False)
class TextData:
    """Token ids (1-D long) per split, the vocabulary, and the books of each split."""

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    vocab: list[str]
    books: dict[str, list[str]]
    name: str = ""

    def __repr__(self) -> str:
        return (
            f"TextData({self.name!r}: train/valid/test {self.train.numel()}/{self.valid.numel()}/"
            f"{self.test.numel()} tokens, vocabulary {len(self.vocab)})"
        )


def tokenize(text: str) -> list[str]:
    """Lower-cased words and punctuation, ``<eos>`` after every paragraph (blank-line separated)."""
    tokens: list[str] = []
    for paragraph in _PARAGRAPH.split(text):
        words = _TOKEN.findall(paragraph.lower())
        if words:
            tokens.extend(words)
            tokens.append(EOS)
    return tokens


def build_vocab(tokens: list[str], vocab_size: int) -> list[str]:
    """``<unk>``, ``<eos>``, then the most frequent other tokens: ``vocab_size`` entries in all."""
    if vocab_size < 3:
        raise ValueError(f"vocab_size must be at least 3, got {vocab_size}")
    counts = Counter(t for t in tokens if t not in (UNK, EOS))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [UNK, EOS] + [word for word, _ in ranked[: vocab_size - 2]]


def encode(tokens: list[str], vocab: list[str]) -> torch.Tensor:
    """Token ids, unknown words as ``<unk>`` (id 0)."""
    index = {word: i for i, word in enumerate(vocab)}
    return torch.tensor([index.get(t, 0) for t in tokens], dtype=torch.long)


def read_gutenberg(folder: Path, vocab_size: int = 10000) -> TextData:
    """Tokenize the books in ``folder`` (cached in the data cache, keyed by the options)."""
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise TypeError(f"vocab_size must be an int, got {vocab_size!r}")
    cached = cache_root() / "gutenberg" / f"tokens-v{TOKENIZER_VERSION}-vocab{vocab_size}.pt"
    return cached_dataclass(cached, TextData, lambda: _tokenize_books(folder, vocab_size))


def _tokenize_books(folder: Path, vocab_size: int) -> TextData:
    books = {
        "train": [b for b in GUTENBERG_BOOKS if b not in VALID_BOOKS + TEST_BOOKS],
        "valid": list(VALID_BOOKS),
        "test": list(TEST_BOOKS),
    }
    tokens: dict[str, list[str]] = {}
    for split, names in books.items():
        tokens[split] = []
        for book in names:
            path = find_file(folder, book)
            if path is None:
                raise FileNotFoundError(f"{folder}: missing Gutenberg book {book}")
            tokens[split].extend(tokenize(read_file(path).decode("latin-1")))
    vocab = build_vocab(tokens["train"], vocab_size)
    return TextData(
        train=encode(tokens["train"], vocab),
        valid=encode(tokens["valid"], vocab),
        test=encode(tokens["test"], vocab),
        vocab=vocab,
        books=books,
        name="gutenberg",
    )
