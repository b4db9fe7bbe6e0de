"""TorchDEQ's way of reading settings (a Namespace, a dict or None, updated by keyword arguments),
and the warnings for what cdeq does differently, each given once per process."""
from __future__ import annotations

import argparse
import warnings
from typing import Any, Optional

WARNED: set[str] = set()  # the keys already warned about (tests clear it)


def warn_once(key: str, message: str) -> None:
    """Warn ``message`` (a UserWarning) the first time ``key`` is seen in this process."""
    if key not in WARNED:
        WARNED.add(key)
        warnings.warn(f"cdeq.compat.torchdeq: {message}", UserWarning, stacklevel=3)


class Settings:
    """``args`` (argparse.Namespace, dict, Settings, any object with attributes, or None) with
    ``kwargs`` on top, read with :meth:`get` as TorchDEQ reads its DEQConfig."""

    def __init__(self, args: Any = None, kwargs: Optional[dict] = None) -> None:
        if args is None:
            values = {}
        elif isinstance(args, Settings):
            values = dict(args.values)
        elif isinstance(args, dict):
            values = dict(args)
        elif isinstance(args, argparse.Namespace) or hasattr(args, "__dict__"):
            values = dict(vars(args))
        else:
            raise TypeError(f"args: expected an argparse.Namespace, a dict or None, got {type(args).__name__}")
        values.update(kwargs or {})
        self.values = values

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)
