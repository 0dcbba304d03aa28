"""One run folder, one live BS: an exclusive flock on <run dir>/bs.lock, held for the BS process's life.

Two BSs on one folder would append to the same records and overwrite each other's checkpoint, and a resumed one
would find its ports taken ("Address already in use"). The kernel releases the lock when the holder exits however
it exits (SIGKILL included), so a stale lock file never blocks anyone; the file holds the holder's pid, to name it.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

LOCK_FILE = "bs.lock"
_PID_READ_TRIES = 20  # the holder writes its pid just after it locks: a reader may come in between


class RunFolderBusy(Exception):
    """The folder's lock is held by a live process (its pid, None if it has not written it yet)."""

    def __init__(self, run_dir: Path, pid: int | None):
        self.run_dir, self.pid = run_dir, pid
        who = f"pid {pid}" if pid is not None else "pid not written yet"
        super().__init__(f"run folder {run_dir} is in use by a live BS ({who}); stop it or use another folder")


class RunLock:
    """The held lock; `release` (or the process's exit) lets the next BS have the folder."""

    def __init__(self, run_dir: Path, fd: int):
        self.run_dir, self._fd = run_dir, fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = -1


def acquire(run_dir: Path) -> RunLock:
    """Lock run_dir (created if missing) for this process and write its pid; RunFolderBusy if another holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = _lock(run_dir)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return RunLock(run_dir, fd)


def check_free(run_dir: Path) -> None:
    """RunFolderBusy if a live process holds run_dir's lock (a starter asks before it touches the folder)."""
    if (run_dir / LOCK_FILE).exists():
        os.close(_lock(run_dir))


def _lock(run_dir: Path) -> int:
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunFolderBusy(run_dir, _holder_pid(run_dir)) from None
    return fd


def _holder_pid(run_dir: Path) -> int | None:
    for _ in range(_PID_READ_TRIES):
        try:
            text = (run_dir / LOCK_FILE).read_text().strip()
        except OSError:
            return None
        if text.isdigit():
            return int(text)
        time.sleep(0.05)
    return None
