"""Planetoid citation graphs (Cora, CiteSeer) from their original ``ind.<name>.<part>`` pickles.

The pickles (Python 2, protocol 2) hold scipy CSR matrices, numpy arrays and a dict of
adjacency lists. They are read with a restricted unpickler that only resolves the few numpy
classes they need; the CSR matrices are rebuilt by a small stand-in class, so scipy is not needed
and no other code can run while loading.
"""
from __future__ import annotations

import io
import pickle
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdeq.data.sources import DataError, find_file, read_file

PARTS = ("x", "y", "tx", "ty", "allx", "ally", "graph", "test.index")
NUM_VAL = 500


@dataclass(repr=False)
class GraphData:
    """A node-classification graph: ``x`` (N, F) float32, ``y`` (N,) long, ``edge_index`` (2, E)
    long (both directions of every undirected edge, no self loops, no duplicates, sorted),
    boolean ``train_mask``/``val_mask``/``test_mask`` (N,), and ``num_classes``."""

    x: torch.Tensor
    y: torch.Tensor
    edge_index: torch.Tensor
    train_mask: torch.Tensor
    val_mask: torch.Tensor
    test_mask: torch.Tensor
    num_classes: int
    name: str = ""

    @property
    def num_nodes(self) -> int:
        return self.x.shape[0]

    def __repr__(self) -> str:
        return (
            f"GraphData({self.name!r}: {self.num_nodes} nodes, {self.x.shape[1]} features, "
            f"{self.edge_index.shape[1]} directed edges, {self.num_classes} classes, "
            f"train/val/test {int(self.train_mask.sum())}/{int(self.val_mask.sum())}/{int(self.test_mask.sum())})"
        )


def undirected_edges(src: np.ndarray, dst: np.ndarray, num_nodes: int) -> torch.Tensor:
    """Both directions of every edge, without self loops or duplicates, sorted by (source, target)."""
    both_src, both_dst = np.concatenate([src, dst]), np.concatenate([dst, src])
    keep = both_src != both_dst
    key = np.unique(both_src[keep].astype(np.int64) * num_nodes + both_dst[keep])
    return torch.from_numpy(np.stack([key // num_nodes, key % num_nodes]))


class _CSR:
    """Stand-in for ``scipy.sparse.csr_matrix`` while unpickling: keeps its arrays."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.shape = tuple(state.get("_shape", state.get("shape")))
        self.data, self.indices, self.indptr = state["data"], state["indices"], state["indptr"]

    def dense(self) -> np.ndarray:
        out = np.zeros(self.shape, dtype=np.float32)
        rows = np.repeat(np.arange(self.shape[0]), np.diff(self.indptr))
        np.add.at(out, (rows, self.indices), self.data.astype(np.float32))
        return out


def _numpy_reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


_ALLOWED = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("scipy.sparse.csr", "csr_matrix"): _CSR,
    ("collections", "defaultdict"): defaultdict,
    ("__builtin__", "list"): list,
    ("builtins", "list"): list,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a Planetoid file") from None


def safe_unpickle(data: bytes, label: str) -> Any:
    """Unpickle a Planetoid part, allowing only the numpy/scipy classes these files use."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as exc:
        raise DataError(f"{label}: cannot read Planetoid pickle: {exc}") from exc


def read_planetoid(folder: Path, name: str) -> GraphData:
    """Build :class:`GraphData` from the raw files ``ind.<name>.*`` in ``folder`` with the standard
    split: the first ``20 * C`` nodes train, the next 500 validation, the ``test.index`` nodes test.
    Test nodes without a feature row (CiteSeer's 15 isolated ones) get zero features and label 0."""
    raw: dict[str, Any] = {}
    for part in PARTS:
        path = find_file(folder, f"ind.{name}.{part}")
        if path is None:
            raise DataError(f"{folder}: missing Planetoid file ind.{name}.{part}")
        data = read_file(path)
        raw[part] = np.array(data.split(), dtype=np.int64) if part == "test.index" else safe_unpickle(data, str(path))
    allx, tx = raw["allx"].dense(), raw["tx"].dense()
    ally, ty = np.asarray(raw["ally"], np.float32), np.asarray(raw["ty"], np.float32)
    test_index = raw["test.index"]
    num_nodes = allx.shape[0] + int(test_index.max() - test_index.min()) + 1
    x = np.zeros((num_nodes, allx.shape[1]), dtype=np.float32)
    onehot = np.zeros((num_nodes, ally.shape[1]), dtype=np.float32)
    x[: allx.shape[0]], onehot[: ally.shape[0]] = allx, ally
    x[test_index], onehot[test_index] = tx, ty  # row j of tx/ty belongs to node test_index[j]

    src, dst = [], []
    for node, neighbours in raw["graph"].items():
        src.extend([node] * len(neighbours))
        dst.extend(neighbours)
    src_a, dst_a = np.asarray(src, np.int64), np.asarray(dst, np.int64)
    if src_a.size and max(src_a.max(), dst_a.max()) >= num_nodes:
        raise DataError(f"{folder}: ind.{name}.graph names a node >= {num_nodes}")

    num_train = raw["y"].shape[0]
    masks = [torch.zeros(num_nodes, dtype=torch.bool) for _ in range(3)]
    masks[0][:num_train] = True
    masks[1][num_train : num_train + NUM_VAL] = True
    masks[2][torch.from_numpy(test_index)] = True
    return GraphData(
        x=torch.from_numpy(x),
        y=torch.from_numpy(onehot.argmax(axis=1)).long(),
        edge_index=undirected_edges(src_a, dst_a, num_nodes),
        train_mask=masks[0],
        val_mask=masks[1],
        test_mask=masks[2],
        num_classes=ally.shape[1],
        name=name,
    )
