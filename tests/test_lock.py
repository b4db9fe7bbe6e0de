"""One writer per run directory (issue 20): a second writer fails at once naming the holder's PID,
a lock left by a killed process is taken over, a clean exit releases it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings

import pytest

from cdeq.lock import LOCK_FILE, RunDirLocked, RunLock, StaleLockWarning

HOLDER = """
import sys
from cdeq.lock import RunLock
with RunLock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()  # hold the lock until the test closes our stdin
"""


@pytest.fixture
def holder(tmp_path):
    """Another process that holds the lock of ``tmp_path / "run"`` until its stdin is closed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "run")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_a_second_writer_fails_naming_the_holders_pid(tmp_path, holder):
    with pytest.raises(RunDirLocked, match=rf"in use by another process \(PID {holder.pid} on ") as e:
        RunLock(tmp_path / "run").acquire()
    assert e.value.pid == holder.pid and e.value.run_dir == tmp_path / "run"
    holder.stdin.close()  # the holder leaves its `with` block: released cleanly
    assert holder.wait() == 0
    assert (tmp_path / "run" / LOCK_FILE).read_text() == ""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean release leaves nothing to take over
        with RunLock(tmp_path / "run") as lock:
            assert lock.held and lock.taken_over is None


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with pytest.warns(StaleLockWarning, match=rf"took over the lock of PID {holder.pid} on .*without releasing"):
        lock = RunLock(tmp_path / "run").acquire()
    try:
        assert lock.taken_over["pid"] == holder.pid
        assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_two_locks_in_one_process_conflict_and_exit_releases(tmp_path):
    with pytest.raises(ValueError, match="boom"):
        with RunLock(tmp_path) as lock:
            record = json.loads((tmp_path / LOCK_FILE).read_text())
            assert record["pid"] == os.getpid() and record["command"]
            with pytest.raises(RunDirLocked, match=f"PID {os.getpid()}"):
                RunLock(tmp_path).acquire()
            raise ValueError("boom")
    assert not lock.held and (tmp_path / LOCK_FILE).read_text() == ""
    with RunLock(tmp_path):  # free again
        pass
