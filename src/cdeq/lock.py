"""One writer per run directory.

:class:`RunLock` holds an advisory ``fcntl.flock`` lock on ``RUN_DIR/run.lock`` and writes its
holder (PID, host, start time, command) into that file. A second writer fails at once with
:class:`RunDirLocked`, naming the holder. The kernel drops the lock when its process dies, however
it dies, so a lock left by a killed run is never in the way: the next writer takes it over and
is told whose it was (a :class:`StaleLockWarning`). A clean release empties the file.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any, Optional

LOCK_FILE = "run.lock"


class RunDirLocked(RuntimeError):
    """Another process holds the lock of this run directory."""

    def __init__(self, run_dir: Path, holder: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.holder = holder
        self.pid: Optional[int] = holder.get("pid")
        super().__init__(f"{run_dir} is in use by another process ({_describe(holder)}); wait for it to end, "
                         "or stop it, or write to another directory")


class StaleLockWarning(UserWarning):
    """The lock was taken over from a process that ended without releasing it."""


def _describe(holder: dict[str, Any]) -> str:
    if not holder.get("pid"):
        return "PID not yet recorded"
    text = f"PID {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
    return text + (f": {holder['command']}" if holder.get("command") else "")


def _read_holder(fd: int) -> dict[str, Any]:
    """The holder recorded in the lock file ({} when it is empty or unreadable)."""
    raw = os.pread(fd, 1 << 16, 0)
    try:
        holder = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"raw": raw[:200].decode("utf-8", "replace")}
    return holder if isinstance(holder, dict) else {}


class RunLock:
    """The lock of one run directory; use as ``with RunLock(out): ...`` around everything that
    writes there. The directory is created if needed."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.taken_over: Optional[dict[str, Any]] = None  # the dead holder this lock replaced, if any
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        """Take the lock or raise :class:`RunDirLocked` at once (never waits)."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: this RunLock is already held")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirLocked(self.run_dir, holder) from None
        except OSError as e:
            os.close(fd)
            raise OSError(e.errno, f"{self.path}: cannot lock the run directory ({e.strerror}; a file "
                                   "system without flock?)") from None
        previous = _read_holder(fd)
        if previous:
            self.taken_over = previous
            warnings.warn(f"{self.path}: took over the lock of {_describe(previous)}, which ended without "
                          "releasing it", StaleLockWarning, stacklevel=2)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the lock file and drop the lock (a no-op when not held)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # an empty file tells the next writer this run ended cleanly
        finally:
            os.close(fd)  # closing drops the flock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.release()
