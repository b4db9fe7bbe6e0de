"""Wall time and peak memory of one inference call, measured the same way for every method, and
where a figure was measured (device, commit)."""
from __future__ import annotations

import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

if TYPE_CHECKING:
    from cdeq.consistency import ConsistencyDEQ


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


def git_commit() -> str:
    """The commit of the cdeq checkout this runs from (``-dirty`` with uncommitted changes)."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    """A human description of the device the run used."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu}, {torch.get_num_threads()} threads"


LATENCY_RATIO = "median of per-round ratios"  # how table.json's latency ratio is formed (earlier: ratio of medians)


def student_latency(student: ConsistencyDEQ, teacher: Any, x: Any, budgets: list[int], device: torch.device,
                    repeats: int = 21) -> dict[str, dict[str, float]]:
    """C-DEQ's time per batch at NFE=k against its floor: the injection, k bare calls of the
    teacher's layer and the readout, on the same batch ``x``. Every budget of both is timed in each
    round; ``cdeq_ms``/``bare_ms`` are medians over rounds, ``ratio`` the median of the ratios within
    a round (steady under load from other processes, which changes between rounds)."""
    def bare(k: int) -> Tensor:
        u = teacher.inject(x)
        z = teacher.init_state(u)
        for _ in range(k):
            z = teacher.layer(z, u)
        return teacher.readout(z)
    fns: dict[str, Callable[[], object]] = {}
    for k in budgets:
        fns[f"cdeq{k}"] = lambda k=k: student.predict(x, nfe=k)
        fns[f"bare{k}"] = lambda k=k: bare(k)
    times = time_rounds_ms(fns, device, warmup=3, repeats=repeats)
    return {str(k): {"cdeq_ms": statistics.median(times[f"cdeq{k}"]), "bare_ms": statistics.median(times[f"bare{k}"]),
                     "ratio": statistics.median(c / b for c, b in zip(times[f"cdeq{k}"], times[f"bare{k}"]))}
            for k in budgets}
