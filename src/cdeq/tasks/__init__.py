"""Benchmarks by name: ``cdeq.tasks.get(name, **options) -> Task``.

Names: ``cora``, ``citeseer`` (graphs, IGNN), ``fashion-mnist``, ``mnist`` (images, MDEQ),
``gutenberg`` (word-level text, DEQ transformer), ``wikitext-2`` (word-level text, DEQ transformer
with an adaptive softmax). Options: ``preset`` (``"tiny"``, ``"cpu"``,
``"gpu"``: the default recipe of the task's builders) and the task's own (e.g. ``explicit`` for
graphs, ``vocab_size`` and ``seq_len`` for text).
"""
from __future__ import annotations

from typing import Any

from cdeq.tasks.base import IGNORE, Task

NAMES = ("cora", "citeseer", "fashion-mnist", "mnist", "gutenberg", "wikitext-2")


def available() -> list[str]:
    """The task names :func:`get` accepts."""
    return list(NAMES)


def get(name: str, **options: Any) -> Task:
    """The task ``name`` with ``options`` (see the module docstring)."""
    if name in ("cora", "citeseer"):
        from cdeq.tasks.graph import GraphTask

        return GraphTask(name, **options)
    if name in ("fashion-mnist", "mnist"):
        from cdeq.tasks.image import ImageTask

        return ImageTask(name, **options)
    if name == "gutenberg":
        from cdeq.tasks.text import TextTask

        return TextTask(name, **options)
    if name == "wikitext-2":
        from cdeq.tasks.wikitext import WikiTextTask

        return WikiTextTask(name, **options)
    raise ValueError(f"name: unknown task {name!r}; available: {list(NAMES)}")


__all__ = ["IGNORE", "NAMES", "Task", "available", "get"]
