"""What a starter and the processes it starts agree on beyond the wire: the parent whose death stops them.

`fedlora-run` puts its own pid in FEDLORA_STOP_WITH_PARENT for the air, the BS and the edges it starts (a sweep's
worker does the same for `fedlora-run`). A process that finds it there calls `stop_with_parent` first thing and is
stopped as by SIGTERM when that process dies, even by SIGKILL: the kernel's PR_SET_PDEATHSIG where the starter is
its direct parent, a watcher thread otherwise (a wrapper in between), and a hard exit if SIGTERM has not ended it
`grace_s` later. Processes started by hand (a multi-host lab) have no such variable and never stop with anyone.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import sys
import threading
import time
from pathlib import Path

STOP_WITH_PARENT_ENV = "FEDLORA_STOP_WITH_PARENT"  # the pid of the process whose death stops this one
STOP_GRACE_S = 5.0  # SIGTERM closes the round in progress; after this long the process exits regardless
_POLL_S = 0.25
_PR_SET_PDEATHSIG = 1


def stop_with_parent(grace_s: float = STOP_GRACE_S) -> int | None:
    """Arm the stop for the pid in FEDLORA_STOP_WITH_PARENT (removed from the environment, so this process's own
    children do not inherit it); the pid, or None if there is none. A value that is not a pid exits with status 2."""
    value = os.environ.pop(STOP_WITH_PARENT_ENV, "")
    if not value:
        return None
    try:
        starter = int(value)
    except ValueError:
        sys.exit(f"{Path(sys.argv[0]).name}: {STOP_WITH_PARENT_ENV}={value!r} is not a process id")
    direct = os.getppid() == starter and _set_parent_death_signal()
    if not _alive(starter, direct):  # it died before the kernel's signal was armed
        os.kill(os.getpid(), signal.SIGTERM)
        direct = True
    threading.Thread(target=_watch, args=(starter, direct, grace_s), name="stop-with-parent", daemon=True).start()
    return starter


STACK_DUMP_SIGNAL = signal.SIGUSR1


def enable_stack_dumps() -> None:
    """`kill -USR1 <pid>` prints where every thread of this process is to its stderr (the log), and it runs on: a
    process that seems stuck in a week-long run says where, without stopping it (faulthandler, in C: it needs no
    free Python thread)."""
    faulthandler.register(STACK_DUMP_SIGNAL, all_threads=True, chain=False)


def _set_parent_death_signal() -> bool:
    """SIGTERM to this process when its parent dies (Linux); False where prctl is not there."""
    try:
        return bool(ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM) == 0)
    except (OSError, AttributeError):  # not Linux
        return False


def _watch(starter: int, signalled: bool, grace_s: float) -> None:
    """Wait for the starter's death; SIGTERM this process unless the kernel does; exit if it outlives grace_s.

    The deadline is faulthandler's C watchdog, not this thread: Python's shutdown (joining threads, atexit) never
    gives a daemon thread the GIL again, and the watchdog needs none. It prints where each thread was, then exits."""
    while _alive(starter, signalled):
        time.sleep(_POLL_S)
    print(f"{Path(sys.argv[0]).name}: process {starter} that started this one is gone; stopping", file=sys.stderr)
    faulthandler.dump_traceback_later(grace_s, exit=True)
    if not signalled:
        os.kill(os.getpid(), signal.SIGTERM)


def _alive(pid: int, is_parent: bool) -> bool:
    """Whether pid still runs: still our parent (immune to pid reuse), or else present and not a zombie."""
    if is_parent:
        return os.getppid() == pid
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no procfs: ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
