"""Wall time and peak memory of one inference call, measured the same way for every method."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 7) -> float:
    """Median wall time of ``fn()`` in milliseconds after ``warmup`` calls (CUDA events on a GPU)."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        _sync(device)
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_rounds_ms(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int = 2,
                   repeats: int = 15) -> dict[str, list[float]]:
    """Wall times in ms of each of ``fns`` in every round, the functions called in turn within a
    round, so that a change of machine load (other processes on a shared CPU) hits all of them
    alike; the ratio of two within a round is steadier than the ratio of their medians."""
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                times[name].append(time_ms(fn, device, warmup=0, repeats=1))
    return times


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak tensor memory allocated during ``fn()`` above what was live before, in MiB.

    On a GPU this is the CUDA caching allocator's peak; on the CPU it is the running sum of the
    allocations and frees that the PyTorch profiler records, in time order.
    """
    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            torch.cuda.synchronize(device)
            return (torch.cuda.max_memory_allocated(device) - base) / 2**20
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        current = peak = 0
        for event in sorted(prof.events(), key=lambda e: e.time_range.start):
            current += event.self_cpu_memory_usage
            peak = max(peak, current)
        return peak / 2**20
