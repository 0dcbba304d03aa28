"""Start real BS and edge processes for integration tests, and always clean them up."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

from launcher.main import entry_point
from proto.control import decode_endpoints

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
TINY = [
    "--set",
    "model.name_or_path=tiny",
    "--set",
    "task.test_size=200",
    "--set",
    "task.max_train=2000",
    "--set",
    "round.heartbeat_s=0.5",
    "--set",
    "training.batch_size=8",
]


class Procs:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.keys_dir: Path | None = None  # the last BS's provisioned keys (<run dir>/keys): what edges start with

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        """Start the console script args[0] (an entry point of this installation) with the rest as arguments."""
        out = open(self.tmp / f"{name}.out", "w")
        p = subprocess.Popen(
            [*entry_point(args[0]), *args[1:]], cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT
        )
        p.name = name  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    def bs(self, run_dir: Path, *extra: str) -> tuple[subprocess.Popen, dict]:
        p = self.start(
            "bs",
            [
                "fedlora-bs",
                "--run-dir",
                str(run_dir),
                "--control",
                "tcp://127.0.0.1:0",
                "--data",
                "tcp://127.0.0.1:0",
                "--log-level",
                "INFO",
                *TINY,
                *extra,
            ],
        )
        endpoints = run_dir / "endpoints.json"
        deadline = time.monotonic() + 180  # a loaded 2-core machine needs a while to import torch + GNU Radio
        while not endpoints.exists():
            assert p.poll() is None, self.output("bs")
            assert time.monotonic() < deadline, "BS did not bind"
            time.sleep(0.1)
        self.keys_dir = run_dir / "keys"
        return p, decode_endpoints(endpoints.read_bytes()).model_dump()  # written whole, then renamed

    def edge(self, control: str, device_id: int, name: str | None = None, key: Path | None = None) -> subprocess.Popen:
        """Edge device_id; its key file is the last BS's (when that BS provisioned keys) unless `key` is given."""
        if key is None and self.keys_dir is not None and (self.keys_dir / f"device-{device_id}.secret.json").exists():
            key = self.keys_dir / f"device-{device_id}.secret.json"
        args = ["fedlora-edge", "--bs", control, "--device-id", str(device_id)]
        return self.start(name or f"edge{device_id}", [*args, *(["--key", str(key)] if key is not None else [])])

    def output(self, name: str) -> str:
        return (self.tmp / f"{name}.out").read_text()

    def wait(self, p: subprocess.Popen, timeout_s: float) -> int:
        """p's exit status; if it runs past timeout_s, it is asked where its threads are (SIGUSR1: proto.launch)
        and the test fails with that, instead of a bare TimeoutExpired."""
        try:
            return p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGUSR1)
            time.sleep(1.0)
            name = getattr(p, "name", "?")
            raise AssertionError(f"{name} still running after {timeout_s} s:\n{self.output(name)[-6000:]}") from None

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()


def read_rounds(run_dir: Path) -> list[dict]:
    path = run_dir / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")


# A ZMTP 3.0 greeting that names CURVE (signature, version 3.0, mechanism, as-server 0, filler): what a stranger
# with a raw TCP socket sends before the handshake's first command.
ZMTP_CURVE_GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"CURVE".ljust(20, b"\x00") + b"\x00" * 32


def stranger_declaring(address: str, declared_bytes: int, body_bytes: int) -> socket.socket:
    """A raw TCP connection to a zmq endpoint that starts a CURVE handshake with one command frame declaring
    declared_bytes and streams up to body_bytes of it (stops where the peer closes the connection)."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    conn = socket.create_connection((host, int(port)), timeout=5)
    conn.sendall(ZMTP_CURVE_GREETING + b"\x06" + struct.pack(">Q", declared_bytes))
    chunk = b"\0" * 65536
    try:
        for _ in range(body_bytes // len(chunk)):
            conn.sendall(chunk)
    except OSError:  # reset: the peer refused the frame at its header
        pass
    return conn


def closed_by_peer(conn: socket.socket, timeout_s: float = 5.0) -> bool:
    """The peer closed the connection (EOF or reset) within timeout_s."""
    conn.settimeout(timeout_s)
    try:
        while conn.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def rss_bytes(pid: int) -> int:
    """A process's resident memory (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")
