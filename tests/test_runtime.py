"""Tests of cdeq.runtime (process set-up of the command-line entry points)."""
from __future__ import annotations

import platform
import sys

import pytest

from cdeq.runtime import tune_cpu_allocator


def test_tuning_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("CDEQ_MALLOC_TUNING", "0")
    assert tune_cpu_allocator() is False


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt thresholds are a glibc feature")
def test_tuning_applies_on_glibc(monkeypatch):
    monkeypatch.delenv("CDEQ_MALLOC_TUNING", raising=False)
    assert tune_cpu_allocator() is True
