"""The Planetoid loader agrees with PyTorch Geometric's ``Planetoid`` on the same raw files."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch

from cdeq import data


def _pyg_planetoid():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch_geometric.datasets import Planetoid
    except ImportError as exc:
        pytest.skip(f"torch_geometric is not importable ({exc}); install the extra: pip install -e '.[graph]'")
    return Planetoid


@pytest.mark.slow
@pytest.mark.parametrize(("name", "pyg_name"), [("cora", "Cora"), ("citeseer", "CiteSeer")])
def test_planetoid_matches_pyg(name: str, pyg_name: str, tmp_path: Path) -> None:
    Planetoid = _pyg_planetoid()
    if not data.describe(name).present:
        pytest.skip(f"{name} not present locally: run `python -m cdeq.data fetch --all`")
    ours = data.load(name)
    raw = tmp_path / pyg_name / "raw"
    raw.mkdir(parents=True)
    for fname in data.REGISTRY[name].files.files:
        shutil.copyfile(data.fetch(name) / fname, raw / fname)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = Planetoid(str(tmp_path), pyg_name)[0]
    assert theirs.num_nodes == ours.num_nodes
    assert torch.equal(theirs.x, ours.x) and torch.equal(theirs.y, ours.y)
    for mask in ("train_mask", "val_mask", "test_mask"):
        assert torch.equal(getattr(theirs, mask), getattr(ours, mask)), mask
    # Same edge set; PyG orders edges by target, we by source.
    def key(e: torch.Tensor) -> torch.Tensor:
        return (e[0] * ours.num_nodes + e[1]).sort().values

    assert torch.equal(key(theirs.edge_index), key(ours.edge_index))
