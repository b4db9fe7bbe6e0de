"""Image classification sets in the idx format (MNIST, Fashion-MNIST)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cdeq.data.sources import DataError, find_file, read_file

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass(repr=False)
class ImageData:
    """Images as uint8 ``(N, H, W)`` (or ``(N, H, W, C)``) with long labels ``(N,)``."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int = 10
    name: str = ""

    def __repr__(self) -> str:
        return (
            f"ImageData({self.name!r}: train {tuple(self.train_images.shape)}, test "
            f"{tuple(self.test_images.shape)}, {self.test_images.dtype}, {self.num_classes} classes)"
        )


def parse_idx(data: bytes, label: str) -> np.ndarray:
    """An unsigned-byte idx array: magic ``00 00 08 <ndim>``, ``ndim`` big-endian int32 sizes, data."""
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise DataError(f"{label}: not an unsigned-byte idx file (magic {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(s) for s in np.frombuffer(data[4:header], dtype=">i4"))
    if len(data) != header + int(np.prod(shape)):
        raise DataError(f"{label}: idx size {len(data)} does not match its shape {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx_set(folder: Path, name: str) -> ImageData:
    """Read the four idx files (plain or gzipped) of an MNIST-style set from ``folder``."""
    arrays = []
    for fname in IDX_FILES:
        path = find_file(folder, fname)
        if path is None:
            raise DataError(f"{folder}: missing idx file {fname}")
        arrays.append(torch.from_numpy(parse_idx(read_file(path), str(path)).copy()))
    train_x, train_y, test_x, test_y = arrays
    return ImageData(train_x, train_y.long(), test_x, test_y.long(), num_classes=10, name=name)
