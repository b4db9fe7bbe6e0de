"""The paper's larger benchmarks, reached through the ecosystem's loaders when installed and
online: WikiText-103 and CIFAR-10 (Hugging Face ``datasets``), ogbn-arxiv (``ogb``)."""
from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import torch

from cdeq.data.images import ImageData
from cdeq.data.planetoid import GraphData, undirected_edges
from cdeq.data.sources import DataError, cache_root
from cdeq.data.text import EOS, TextData, build_vocab, encode


class MissingDependencyError(DataError):
    """A data set needs a package that is not installed; the message says what to install."""


def require(module: str, dataset: str, install: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming ``install``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"data set {dataset!r} is read through the {module.split('.')[0]!r} package, which is not "
            f"installed: `{install}` (downloading it also needs internet access)"
        ) from exc


def _call(dataset: str, what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:
        raise DataError(f"data set {dataset!r}: {what} failed (offline?): {exc}") from exc


def read_wikitext103() -> TextData:
    """WikiText-103 (already tokenized, ``wikitext-103-v1``): whitespace tokens, ``<eos>`` per
    non-empty line, the full training vocabulary (``<unk>`` is id 0)."""
    datasets = require("datasets", "wikitext-103", "pip install datasets")
    splits = _call(
        "wikitext-103", "datasets.load_dataset", lambda: datasets.load_dataset("Salesforce/wikitext", "wikitext-103-v1")
    )
    tokens = {}
    for ours, theirs in (("train", "train"), ("valid", "validation"), ("test", "test")):
        tokens[ours] = [t for line in splits[theirs]["text"] if line.strip() for t in (*line.split(), EOS)]
    vocab = build_vocab(tokens["train"], len(set(tokens["train"])) + 2)
    return TextData(
        train=encode(tokens["train"], vocab),
        valid=encode(tokens["valid"], vocab),
        test=encode(tokens["test"], vocab),
        vocab=vocab,
        books={"train": ["train"], "valid": ["validation"], "test": ["test"]},
        name="wikitext-103",
    )


def read_cifar10() -> ImageData:
    """CIFAR-10: images uint8 ``(N, 32, 32, 3)``, labels long."""
    datasets = require("datasets", "cifar-10", "pip install datasets pillow")
    splits = _call("cifar-10", "datasets.load_dataset", lambda: datasets.load_dataset("uoft-cs/cifar10"))

    def convert(split: Any) -> tuple[torch.Tensor, torch.Tensor]:
        images = np.stack([np.asarray(img.convert("RGB"), dtype=np.uint8) for img in split["img"]])
        return torch.from_numpy(images), torch.as_tensor(split["label"], dtype=torch.long)

    train_x, train_y = convert(splits["train"])
    test_x, test_y = convert(splits["test"])
    return ImageData(train_x, train_y, test_x, test_y, num_classes=10, name="cifar-10")


def read_ogbn_arxiv() -> GraphData:
    """ogbn-arxiv: 128-d features, citations made undirected, the official time-based split."""
    nodeprop = require("ogb.nodeproppred", "ogbn-arxiv", "pip install ogb")
    root = str(cache_root() / "ogb")
    ds = _call("ogbn-arxiv", "ogb download", lambda: nodeprop.NodePropPredDataset(name="ogbn-arxiv", root=root))
    graph, labels = ds[0]
    split = ds.get_idx_split()
    num_nodes = int(graph["num_nodes"])
    masks = {}
    for key in ("train", "valid", "test"):
        masks[key] = torch.zeros(num_nodes, dtype=torch.bool)
        masks[key][torch.as_tensor(np.asarray(split[key]), dtype=torch.long)] = True
    edges = np.asarray(graph["edge_index"])
    return GraphData(
        x=torch.as_tensor(np.asarray(graph["node_feat"]), dtype=torch.float32),
        y=torch.as_tensor(np.asarray(labels).reshape(-1), dtype=torch.long),
        edge_index=undirected_edges(edges[0], edges[1], num_nodes),
        train_mask=masks["train"],
        val_mask=masks["valid"],
        test_mask=masks["test"],
        num_classes=int(ds.num_classes),
        name="ogbn-arxiv",
    )
