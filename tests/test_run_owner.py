"""One run, one owner: the BS locks its run folder, and the processes `fedlora-run` starts die with it.

Real processes and real signals: the launcher is SIGKILLed mid-run and nothing of its run may be left 10 s later
(then `--resume` finishes the run); a second BS, or a resume, on a folder whose BS is alive is refused in one line;
and the stop-with-parent rule (proto.launch) is checked on bare Python processes, a wrapper in between included,
and on processes started without it, which must outlive their parent.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from launcher.main import entry_point
from proto.launch import STOP_WITH_PARENT_ENV
from tests.processes import ENV, REPO, TINY, read_rounds, wait_for

LAUNCH = [sys.executable, "-m", "launcher.main", "--bench", str(REPO / "hw_configs" / "sim.yaml"), *TINY]
RUN = [*LAUNCH, "--set", "devices.count=2", "--set", "round.rounds=3", "--set", "training.local_steps=4"]


def _gone(proc: psutil.Process) -> bool:
    """Exited (a zombie waiting for its reaper counts as exited); pid reuse is caught by psutil's start time."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not all(_gone(p) for p in procs):
        time.sleep(0.1)
    return [p for p in procs if not _gone(p)]


@pytest.mark.integration
def test_a_live_run_folder_is_refused_and_a_killed_launcher_takes_its_run_down_and_resume_finishes_it(tmp_path):
    """While the run is alive a second BS and fedlora-run (--resume, --run-dir) on its folder are refused in one
    line; then the launcher is SIGKILLed, nothing of the run is left 10 s later, and --resume (the kernel dropped the
    dead BS's lock) finishes the run. One run for both: each start of four processes costs ~10 CPU-s."""
    run_dir = tmp_path / "run"
    with open(tmp_path / "first.out", "w") as out:
        launcher = subprocess.Popen([*RUN, "--run-dir", str(run_dir)], cwd=REPO, env=ENV, stdout=out, stderr=out)
    started: list[psutil.Process] = []
    try:
        wait_for(lambda: (run_dir / "endpoints.json").exists(), 300, "the BS bound")  # it holds the lock by then
        bs = next(p for p in psutil.Process(launcher.pid).children() if Path(p.cmdline()[1]).name == "fedlora-bs")
        _refused_while_alive(run_dir, bs.pid)
        wait_for(lambda: len(read_rounds(run_dir)) >= 1, 300, "round 1 closed")
        started = psutil.Process(launcher.pid).children(recursive=True)
        names = sorted(Path(p.cmdline()[1]).name for p in started)
        assert names == ["fedlora-bs", "fedlora-edge", "fedlora-edge"], names
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        killed = time.monotonic()
        left = _wait_gone(started, 10.0)
        assert not left, [(p.pid, p.cmdline()) for p in left]
        print(f"every process of the run gone {time.monotonic() - killed:.1f} s after the launcher's SIGKILL")
    finally:
        for p in started:
            if not _gone(p):
                p.kill()
        if launcher.poll() is None:
            launcher.kill()
    out = subprocess.run(
        [sys.executable, "-m", "launcher.main", "--resume", str(run_dir)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert out.returncode == 0, out.stdout + out.stderr + (run_dir / "logs" / "bs.log").read_text()[-3000:]
    assert [r["round"] for r in read_rounds(run_dir)] == [1, 2, 3]


def _refused_while_alive(run_dir: Path, bs_pid: int) -> None:
    expected = f"run folder {run_dir} is in use by a live BS (pid {bs_pid}); stop it or use another folder"
    second = subprocess.run(
        [*entry_point("fedlora-bs"), "--run-dir", str(run_dir), "--resume", *TINY],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (second.returncode, second.stdout, second.stderr) == (2, "", f"fedlora-bs: {expected}\n")
    for flags in (["--resume", str(run_dir)], ["--run-dir", str(run_dir), *TINY]):
        launcher = subprocess.run(
            [sys.executable, "-m", "launcher.main", *flags], cwd=REPO, env=ENV, capture_output=True, text=True
        )
        assert (launcher.returncode, launcher.stdout, launcher.stderr) == (2, "", f"fedlora-run: {expected}\n")


CHILD = textwrap.dedent(
    """
    import signal, sys, time
    from proto.launch import stop_with_parent
    stop_with_parent(grace_s=float(sys.argv[1]))
    if sys.argv[2] == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a child stuck in its round: only the hard exit ends it
    print("armed", flush=True)
    time.sleep(120)
    """
)


def _family(tmp_path: Path, *, env_pid: bool, wrapper: bool, grace_s: float = 5.0, term: str = "obey"):
    """A starter process that starts CHILD (through `sh -c '...; true'` if wrapper) and prints the child's pid;
    returns the starter and the child (a psutil.Process)."""
    child = [sys.executable, "-c", CHILD, str(grace_s), term]
    starter_code = textwrap.dedent(
        f"""
        import os, shlex, subprocess, sys, time
        env = dict(os.environ)
        if {env_pid!r}:
            env[{STOP_WITH_PARENT_ENV!r}] = str(os.getpid())
        cmd = {child!r}
        if {wrapper!r}:  # a shell that does not exec: the real process is a grandchild
            cmd = ["sh", "-c", shlex.join(cmd) + "; true"]
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert p.stdout.readline() == "armed\\n"
        print(p.pid, flush=True)
        time.sleep(120)
        """
    )
    starter = subprocess.Popen(
        [sys.executable, "-c", starter_code], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True
    )
    assert starter.stdout is not None
    top = psutil.Process(int(starter.stdout.readline()))
    real = top.children()[0] if wrapper else top
    return starter, real


@pytest.mark.parametrize("wrapper", [False, True], ids=["direct", "through-a-wrapper"])
def test_a_started_process_stops_when_its_starter_is_killed(tmp_path, wrapper):
    starter, child = _family(tmp_path, env_pid=True, wrapper=wrapper)
    try:
        assert not _gone(child)
        starter.kill()
        starter.wait()
        assert not _wait_gone([child], 3.0), "the child outlived its starter"
    finally:
        for p in [child] if not _gone(child) else []:
            p.kill()


def test_a_child_that_ignores_sigterm_is_ended_after_the_grace(tmp_path):
    starter, child = _family(tmp_path, env_pid=True, wrapper=False, grace_s=1.0, term="ignore-term")
    try:
        starter.kill()
        starter.wait()
        time.sleep(0.5)
        assert not _gone(child), "ended before its grace"
        assert not _wait_gone([child], 3.0), "still running well after its grace"
    finally:
        if not _gone(child):
            child.kill()


def test_a_process_started_by_hand_outlives_its_parent(tmp_path):
    """A lab's fedlora-bs or fedlora-edge in a shell that goes away: no variable, no stop."""
    starter, child = _family(tmp_path, env_pid=False, wrapper=False)
    try:
        starter.kill()
        starter.wait()
        time.sleep(1.5)
        assert not _gone(child)
    finally:
        if not _gone(child):
            child.kill()


def test_sigusr1_prints_every_threads_stack_and_the_process_runs_on(tmp_path):
    """proto.launch.enable_stack_dumps: a process that seems stuck says where, without being stopped."""
    code = textwrap.dedent(
        """
        import threading, time
        from proto.launch import enable_stack_dumps
        enable_stack_dumps()
        threading.Thread(target=lambda: time.sleep(120), name="helper", daemon=True).start()
        print("armed", flush=True)
        time.sleep(120)
        """
    )
    err = open(tmp_path / "err", "w")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline() == "armed\n"
        p.send_signal(signal.SIGUSR1)
        wait_for(lambda: "Current thread" in (tmp_path / "err").read_text(), 10, "the stack dump")
        dump = (tmp_path / "err").read_text()
        assert "in <lambda>" in dump and "in <module>" in dump, dump  # the helper thread's stack and the main one
        assert p.poll() is None  # it runs on
    finally:
        p.kill()
        p.wait()
