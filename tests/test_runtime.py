"""Tests of cdeq.runtime (process set-up of the command-line entry points)."""
from __future__ import annotations

import os
import platform
import sys

import pytest
import torch

from cdeq.runtime import quiet_profiler, tune_cpu_allocator


def test_tuning_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("CDEQ_MALLOC_TUNING", "0")
    assert tune_cpu_allocator() is False


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt thresholds are a glibc feature")
def test_tuning_applies_on_glibc(monkeypatch):
    monkeypatch.delenv("CDEQ_MALLOC_TUNING", raising=False)
    assert tune_cpu_allocator() is True


PROFILE_ONCE = """
import sys, torch
from cdeq.measure import peak_memory_mb
from cdeq.runtime import quiet_profiler
if sys.argv[1] == "quiet":
    quiet_profiler()
print(peak_memory_mb(lambda: torch.ones(1 << 16) * 2, torch.device("cpu")))
"""


@pytest.mark.parametrize("mode", ["quiet", "default"])
def test_quiet_profiler_silences_the_peak_memory_measurement(mode, monkeypatch):
    """With quiet_profiler the CPU peak-memory measurement writes nothing on stderr; without it,
    torch 2.13's Kineto writes its profiler_start / profiler_stop lines (the noise it removes)."""
    import subprocess

    monkeypatch.delenv("KINETO_LOG_LEVEL", raising=False)
    done = subprocess.run([sys.executable, "-c", PROFILE_ONCE, mode], capture_output=True, text=True, check=True)
    assert float(done.stdout.split()[-1]) > 0.2  # the 256 KiB product was measured
    if mode == "quiet":
        assert done.stderr == ""
    elif torch.__version__.startswith("2.13"):  # the version the pin installs
        assert "profiler_start" in done.stderr


def test_quiet_profiler_keeps_a_level_the_user_set(monkeypatch):
    monkeypatch.setenv("KINETO_LOG_LEVEL", "2")
    assert quiet_profiler() is False
    assert os.environ["KINETO_LOG_LEVEL"] == "2"
    monkeypatch.delenv("KINETO_LOG_LEVEL")
    assert quiet_profiler() is True
    assert os.environ["KINETO_LOG_LEVEL"] == "6"
